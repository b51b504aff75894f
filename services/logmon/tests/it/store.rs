use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use logmon::store::{self, Entry, Limits, LogStore};
use logmon::tail::Tailer;

fn entry(log: &str, text: String) -> Entry {
    Entry {
        ts_ms: 1_735_787_045_678,
        log: log.into(),
        tag: "stdout".into(),
        pid: Some(7),
        text,
    }
}

/// (apparent bytes, allocated bytes, files) of the directory.
fn disk_use(dir: &Path) -> (u64, u64, u64) {
    let mut totals = (0, 0, 0);
    for e in fs::read_dir(dir).unwrap() {
        // The writer rotates and deletes files while we look: one listed may be gone.
        let meta = match e.unwrap().metadata() {
            Ok(meta) => meta,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => panic!("{err}"),
        };
        totals.0 += meta.len();
        totals.1 += meta.blocks() * 512;
        totals.2 += 1;
    }
    totals
}

#[test]
fn writing_ten_times_the_cap_keeps_disk_use_under_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join(store::LOG_DIR);
    // Small caps, same arithmetic as the defaults: six logs of at most 3 × 64 KiB would need
    // 1152 KiB; the total cap of 512 KiB must win.
    let limits = Limits {
        file_bytes: 64 << 10,
        rotated_files: 2,
        total_bytes: 512 << 10,
    };
    let shared = Arc::new(Mutex::new(LogStore::open(&logs, limits).unwrap()));
    let (tx, writer) = store::spawn_writer(shared.clone(), "test-writer", |e: Entry| e).unwrap();
    let services = [
        "nginx",
        "mariadb",
        "app",
        "balancer",
        "logmon",
        store::SUPERVISOR_LOG,
    ];
    let mut written = 0u64;
    let mut i = 0u64;
    // The newest line of each log the queue took: a full queue drops (on a loaded machine the
    // writer falls behind), and a dropped line is not one the store could keep.
    let mut newest = [None; 6];
    while written < 10 * limits.total_bytes {
        let log = services[(i % 6) as usize];
        let text = format!("line {i} {}", "x".repeat((i % 200) as usize));
        let len = store::format_line(&entry(log, text.clone())).len() as u64;
        if tx.send(entry(log, text)) {
            written += len;
            newest[(i % 6) as usize] = Some(i);
        }
        i += 1;
        if i % 5000 == 0 {
            let (apparent, _, _) = disk_use(&logs);
            assert!(
                apparent <= limits.total_bytes,
                "{apparent} bytes on disk after {written} written"
            );
        }
    }
    let dropped = tx.dropped();
    drop(tx);
    writer.join().unwrap();

    let (apparent, allocated, files) = disk_use(&logs);
    eprintln!("wrote {written} bytes in {i} lines ({dropped} dropped); {apparent} bytes ({allocated} allocated) in {files} files");
    assert!(written >= 10 * limits.total_bytes);
    assert!(
        apparent <= limits.total_bytes,
        "{apparent} > {}",
        limits.total_bytes
    );
    // Block rounding adds at most one block per file.
    assert!(
        allocated <= limits.total_bytes + files * 4096,
        "{allocated} allocated"
    );
    assert_eq!(apparent, shared.lock().unwrap().total_bytes());
    for e in fs::read_dir(&logs).unwrap() {
        let e = e.unwrap();
        assert!(
            e.metadata().unwrap().len() <= limits.file_bytes,
            "{:?} is over the file cap",
            e.file_name()
        );
    }
    // The newest line of every log survived.
    for (log, last) in services.iter().zip(newest) {
        let last = last.unwrap();
        let current = fs::read_to_string(logs.join(format!("{log}.log"))).unwrap();
        assert!(
            current.contains(&format!(" line {last} ")),
            "{log}: line {last} missing"
        );
    }

    // Reopening counts what is there and keeps within the cap, even with a lower one.
    let smaller = Limits {
        total_bytes: 128 << 10,
        ..limits
    };
    let reopened = LogStore::open(&logs, smaller).unwrap();
    assert!(reopened.total_bytes() <= smaller.total_bytes);
    assert!(disk_use(&logs).0 <= smaller.total_bytes);
}

#[test]
fn tailer_follows_rotation_without_losing_lines() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        file_bytes: 2048,
        rotated_files: 1,
        total_bytes: 1 << 20,
    };
    let mut store = LogStore::open(dir.path(), limits).unwrap();
    store
        .append(&entry("nginx", "before the tailer".into()))
        .unwrap();
    store.flush().unwrap();
    let mut tailer = Tailer::new(dir.path(), &["supervisor"], true);
    assert!(
        tailer.poll().unwrap().is_empty(),
        "existing lines are skipped"
    );

    let mut seen = Vec::new();
    for n in 0..500 {
        store.append(&entry("nginx", format!("n{n}"))).unwrap();
        store.append(&entry("supervisor", format!("s{n}"))).unwrap();
        // Poll now and then: at most one rotation happens in between.
        if n % 20 == 0 {
            store.flush().unwrap();
            seen.extend(tailer.poll().unwrap());
        }
    }
    store.flush().unwrap();
    seen.extend(tailer.poll().unwrap());
    assert!(
        seen.iter().all(|l| l.log == "nginx"),
        "skipped logs are not read"
    );
    let texts: Vec<String> = seen
        .iter()
        .map(|l| store::parse_line(&l.line).unwrap().text.to_string())
        .collect();
    let expected: Vec<String> = (0..500).map(|n| format!("n{n}")).collect();
    assert_eq!(texts, expected);
    assert!(dir.path().join("nginx.log.1").exists(), "the test rotated");
}

#[test]
fn certificate_expiry_from_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let (key, pem, der) = (
        dir.path().join("key.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("cert.der"),
    );
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("openssl: {e} (install it: apt-get install openssl)"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "10",
        "-subj",
        "/CN=tandem.test",
        "-keyout",
        &p(&key),
        "-out",
        &p(&pem),
    ]);
    run(&["x509", "-in", &p(&pem), "-outform", "der", "-out", &p(&der)]);
    let expected = logmon::time::now_ms() + 10 * 86_400_000;
    for file in [&pem, &der] {
        let got = logmon::cert::not_after_ms(&fs::read(file).unwrap()).unwrap();
        assert!(
            (got - expected).abs() < 120_000,
            "{}: notAfter {got}, expected about {expected}",
            file.display()
        );
    }
}
