//! Backend selection: round robin, weighted round robin and least connections, over the
//! backends that may take traffic now (active-active, or active-passive with backups).
//!
//! Round robin and weighted round robin share one path: a schedule (a list of backend indexes,
//! each repeated by its weight, interleaved by the smooth weighted round robin of nginx) is built
//! whenever the health of a backend or the configuration changes, and each request takes
//! `schedule[cursor % len]`. A request then costs one atomic increment and one array lookup.

use cluster_config::{Algorithm, BalancerMode};

/// What selection needs to know about one backend, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub weight: u32,
    pub backup: bool,
    pub up: bool,
    /// Requests in flight on this backend (least connections only).
    pub active: u64,
}

/// The backends that may take traffic: every active backend that is up; in active-passive mode,
/// when no active backend is up, every backup that is up. In active-active mode the `backup`
/// flag is ignored. Backends with weight 0 never take traffic.
pub fn eligible(cands: &[Candidate], mode: BalancerMode) -> Vec<usize> {
    let usable = |c: &Candidate| c.up && c.weight > 0;
    match mode {
        BalancerMode::ActiveActive => (0..cands.len()).filter(|&i| usable(&cands[i])).collect(),
        BalancerMode::ActivePassive => {
            let active: Vec<usize> = (0..cands.len())
                .filter(|&i| !cands[i].backup && usable(&cands[i]))
                .collect();
            if !active.is_empty() {
                return active;
            }
            (0..cands.len())
                .filter(|&i| cands[i].backup && usable(&cands[i]))
                .collect()
        }
    }
}

/// The schedule for the current state. Empty when no backend can take traffic.
///
/// Round robin and least connections list every eligible backend once; weighted round robin
/// repeats each by its weight, spread out (smooth weighted round robin), so weights 2:1 give
/// `a a b` interleaved as `a b a`, never long runs of one backend.
pub fn schedule(cands: &[Candidate], algorithm: Algorithm, mode: BalancerMode) -> Vec<usize> {
    let ids = eligible(cands, mode);
    match algorithm {
        Algorithm::RoundRobin | Algorithm::LeastConnections => ids,
        Algorithm::WeightedRoundRobin => smooth_weighted(&ids, cands),
    }
}

fn smooth_weighted(ids: &[usize], cands: &[Candidate]) -> Vec<usize> {
    // Reduce the weights by their gcd so the schedule stays as short as possible.
    let g = ids.iter().fold(0, |g, &i| gcd(g, cands[i].weight));
    let weights: Vec<i64> = ids
        .iter()
        .map(|&i| i64::from(cands[i].weight / g.max(1)))
        .collect();
    let total: i64 = weights.iter().sum();
    // A huge total (weights are u32) would make a huge schedule; cap it, keeping proportions
    // approximately, since exact ratios beyond a few thousand slots make no difference.
    const MAX_SLOTS: i64 = 4096;
    let weights: Vec<i64> = if total > MAX_SLOTS {
        weights
            .iter()
            .map(|&w| (w * MAX_SLOTS / total).max(1))
            .collect()
    } else {
        weights
    };
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; ids.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for k in 0..ids.len() {
            current[k] += weights[k];
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        out.push(ids[best]);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Pick a backend for one request. `cursor` is a counter that advances once per request;
/// `exclude` is a backend that already failed this request (a retry goes elsewhere when it can).
pub fn pick(
    schedule: &[usize],
    cands: &[Candidate],
    algorithm: Algorithm,
    cursor: u64,
    exclude: Option<usize>,
) -> Option<usize> {
    if schedule.is_empty() {
        return None;
    }
    let len = schedule.len();
    let start = (cursor % len as u64) as usize;
    let rotated = (0..len).map(|k| schedule[(start + k) % len]);
    match algorithm {
        Algorithm::RoundRobin | Algorithm::WeightedRoundRobin => {
            let mut it = rotated.filter(|&i| Some(i) != exclude);
            it.next()
        }
        Algorithm::LeastConnections => {
            // Lowest active/weight wins; ties go to the first after the cursor, so equal loads
            // still alternate.
            let mut best: Option<usize> = None;
            for i in rotated.filter(|&i| Some(i) != exclude) {
                best = match best {
                    None => Some(i),
                    Some(b) => {
                        let (ci, cb) = (&cands[i], &cands[b]);
                        let lhs = u128::from(ci.active) * u128::from(cb.weight.max(1));
                        let rhs = u128::from(cb.active) * u128::from(ci.weight.max(1));
                        if lhs < rhs {
                            Some(i)
                        } else {
                            Some(b)
                        }
                    }
                };
            }
            best
        }
    }
}

/// Pick a backend for the retry of a request that failed on `failed`: the choice is made as if
/// `failed` were down, so an active-passive pair retries on the backup even before the failed
/// active backend has reached `fall`.
pub fn pick_retry(
    cands: &[Candidate],
    algorithm: Algorithm,
    mode: BalancerMode,
    cursor: u64,
    failed: usize,
) -> Option<usize> {
    let mut cands = cands.to_vec();
    if let Some(c) = cands.get_mut(failed) {
        c.up = false;
    }
    let s = schedule(&cands, algorithm, mode);
    pick(&s, &cands, algorithm, cursor, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::*;
    use BalancerMode::*;

    fn c(weight: u32, backup: bool, up: bool) -> Candidate {
        Candidate {
            weight,
            backup,
            up,
            active: 0,
        }
    }

    /// Picks for `n` consecutive requests, as backend indexes (or `-` for none).
    fn run(cands: &[Candidate], algorithm: Algorithm, mode: BalancerMode, n: u64) -> String {
        let s = schedule(cands, algorithm, mode);
        (0..n)
            .map(|k| match pick(&s, cands, algorithm, k, None) {
                Some(i) => char::from(b'a' + i as u8),
                None => '-',
            })
            .collect()
    }

    #[test]
    fn selection_table() {
        let up = |w| c(w, false, true);
        let down = |w| c(w, false, false);
        let bup = |w| c(w, true, true);
        let bdown = |w| c(w, true, false);
        #[rustfmt::skip]
        let table: Vec<(&str, Vec<Candidate>, Algorithm, BalancerMode, &str)> = vec![
            ("rr two up",              vec![up(1), up(1)],          RoundRobin, ActiveActive, "ababab"),
            ("rr ignores weights",     vec![up(3), up(1)],          RoundRobin, ActiveActive, "ababab"),
            ("rr one down",            vec![up(1), down(1)],        RoundRobin, ActiveActive, "aaaaaa"),
            ("rr all down",            vec![down(1), down(1)],      RoundRobin, ActiveActive, "------"),
            ("rr backup is active in active-active", vec![up(1), bup(1)], RoundRobin, ActiveActive, "ababab"),
            ("wrr 2:1 interleaved",    vec![up(2), up(1)],          WeightedRoundRobin, ActiveActive, "abaaba"),
            ("wrr 3:1",                vec![up(3), up(1)],          WeightedRoundRobin, ActiveActive, "aabaaaba"),
            ("wrr gcd 4:2 = 2:1",      vec![up(4), up(2)],          WeightedRoundRobin, ActiveActive, "abaaba"),
            ("wrr weight 0 never",     vec![up(0), up(1)],          WeightedRoundRobin, ActiveActive, "bbbb"),
            ("ap active only",         vec![up(1), bup(1)],         RoundRobin, ActivePassive, "aaaa"),
            ("ap two actives",         vec![up(1), up(1), bup(1)],  RoundRobin, ActivePassive, "abab"),
            ("ap backup when active down", vec![down(1), bup(1)],   RoundRobin, ActivePassive, "bbbb"),
            ("ap two backups share",   vec![down(1), bup(1), bup(1)], RoundRobin, ActivePassive, "bcbc"),
            ("ap backup down too",     vec![down(1), bdown(1)],     RoundRobin, ActivePassive, "----"),
            ("ap without backups",     vec![up(1), up(1)],          RoundRobin, ActivePassive, "abab"),
            ("lc equal loads alternate", vec![up(1), up(1)],        LeastConnections, ActiveActive, "abab"),
        ];
        for (name, cands, algorithm, mode, expected) in table {
            let got = run(&cands, algorithm, mode, expected.len() as u64);
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn weighted_split_is_exact_over_a_full_cycle() {
        let cands = [c(5, false, true), c(3, false, true), c(2, false, true)];
        let s = schedule(&cands, WeightedRoundRobin, ActiveActive);
        let mut counts = [0; 3];
        for k in 0..1000 {
            counts[pick(&s, &cands, WeightedRoundRobin, k, None).unwrap()] += 1;
        }
        assert_eq!(counts, [500, 300, 200]);
    }

    #[test]
    fn huge_weights_keep_a_short_schedule() {
        let cands = [c(u32::MAX, false, true), c(u32::MAX / 3, false, true)];
        let s = schedule(&cands, WeightedRoundRobin, ActiveActive);
        assert!(s.len() <= 4100, "{}", s.len());
        assert!(s.contains(&0) && s.contains(&1));
    }

    #[test]
    fn retry_goes_to_the_backup_when_the_only_active_failed() {
        let cands = [c(1, false, true), c(1, true, true)];
        for mode in [ActiveActive, ActivePassive] {
            assert_eq!(
                pick_retry(&cands, RoundRobin, mode, 0, 0),
                Some(1),
                "{mode:?}"
            );
        }
        assert_eq!(
            pick_retry(&cands[..1], RoundRobin, ActivePassive, 0, 0),
            None
        );
    }

    #[test]
    fn least_connections_prefers_lower_load_per_weight() {
        let mut cands = [c(1, false, true), c(1, false, true), c(2, false, true)];
        cands[0].active = 5;
        cands[1].active = 2;
        cands[2].active = 3; // 1.5 per weight unit: the least loaded
        let s = schedule(&cands, LeastConnections, ActiveActive);
        for k in 0..4 {
            assert_eq!(pick(&s, &cands, LeastConnections, k, None), Some(2));
        }
        assert_eq!(pick(&s, &cands, LeastConnections, 0, Some(2)), Some(1));
    }

    #[test]
    fn retry_excludes_the_failed_backend_when_another_exists() {
        let cands = [c(1, false, true), c(1, false, true)];
        for algorithm in [RoundRobin, WeightedRoundRobin, LeastConnections] {
            let s = schedule(&cands, algorithm, ActiveActive);
            for k in 0..4 {
                assert_eq!(
                    pick(&s, &cands, algorithm, k, Some(0)),
                    Some(1),
                    "{algorithm:?}"
                );
            }
            let single = schedule(&cands[..1], algorithm, ActiveActive);
            assert_eq!(pick(&single, &cands[..1], algorithm, 0, Some(0)), None);
        }
    }
}
