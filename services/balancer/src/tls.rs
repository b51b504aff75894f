//! TLS termination: rustls with the ring provider, TLS 1.2 and 1.3 only, ALPN h2 and
//! http/1.1, certificates chosen by SNI and swapped on reload without touching open
//! connections.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::files::balancer_self_signed;
use arc_swap::ArcSwap;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::plan::Plan;
use crate::BalancerError;

/// A certificate chain and key in PEM files, served for the given names (SNI). A name may be
/// a wildcard such as `*.example.com` (one label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub names: Vec<String>,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug)]
struct Store {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

/// Picks the certificate for a client's SNI name; unknown or absent names get the default (the
/// cluster's own certificate).
#[derive(Debug)]
pub(crate) struct SniResolver {
    store: ArcSwap<Store>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        let Some(name) = hello.server_name() else {
            return Some(store.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(c) = store.exact.get(&name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = store.wildcard.get(parent) {
                return Some(c.clone());
            }
        }
        Some(store.default.clone())
    }
}

impl SniResolver {
    pub(crate) fn load(
        plan: &Plan,
        state_dir: &Path,
        extra: &[CertificateFiles],
    ) -> Result<SniResolver, BalancerError> {
        Ok(SniResolver {
            store: ArcSwap::from_pointee(load_store(plan, state_dir, extra)?),
        })
    }

    /// Re-read every certificate; on error the old ones stay in use.
    pub(crate) fn reload(
        &self,
        plan: &Plan,
        state_dir: &Path,
        extra: &[CertificateFiles],
    ) -> Result<(), BalancerError> {
        self.store
            .store(Arc::new(load_store(plan, state_dir, extra)?));
        Ok(())
    }
}

fn load_store(
    plan: &Plan,
    state_dir: &Path,
    extra: &[CertificateFiles],
) -> Result<Store, BalancerError> {
    let (cert, key) = match (&plan.certificate, &plan.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => ensure_self_signed(state_dir, &plan.self_signed_names)?,
    };
    let default = Arc::new(load_certified_key(&cert, &key)?);
    let mut store = Store {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default: default.clone(),
    };
    store
        .exact
        .insert(plan.domain.to_ascii_lowercase(), default);
    for files in extra {
        let ck = Arc::new(load_certified_key(&files.certificate, &files.key)?);
        for name in &files.names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => store.wildcard.insert(parent.to_string(), ck.clone()),
                None => store.exact.insert(name, ck.clone()),
            };
        }
    }
    Ok(store)
}

pub(crate) fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, BalancerError> {
    let tls_err = |path: &Path, message: String| BalancerError::Tls {
        path: path.to_path_buf(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(cert, format!("bad PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(tls_err(cert, "no certificate in the file".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls_err(key, format!("cannot read the private key: {e}")))?;
    let signing = provider::sign::any_supported_type(&der)
        .map_err(|e| tls_err(key, format!("unsupported private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(e) => Err(tls_err(
            key,
            format!("does not match {}: {e}", cert.display()),
        )),
    }
}

/// The self-signed certificate and key under `state_dir` ([`balancer_self_signed`]: the log
/// monitor watches the certificate there), generated on first use and kept (the key readable by
/// its owner only), so every restart serves the same certificate.
pub(crate) fn ensure_self_signed(
    state_dir: &Path,
    names: &[String],
) -> Result<(PathBuf, PathBuf), BalancerError> {
    let (cert_path, key_path) = balancer_self_signed(state_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BalancerError::Io { path, source }
    };
    let dir = cert_path.parent().unwrap_or(state_dir);
    fs::create_dir_all(dir).map_err(io(dir))?;
    let certified = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| {
        BalancerError::TlsSetup(format!("cannot generate a self-signed certificate: {e}"))
    })?;
    let key_pem = certified.key_pair.serialize_pem();
    api::fsio::write_atomic(&key_path, key_pem.as_bytes(), 0o600, None).map_err(io(&key_path))?;
    api::fsio::write_atomic(&cert_path, certified.cert.pem().as_bytes(), 0o644, None)
        .map_err(io(&cert_path))?;
    tracing::info!(path = %cert_path.display(), names = ?names, "generated a self-signed certificate");
    Ok((cert_path, key_path))
}

pub(crate) fn server_config(resolver: Arc<SniResolver>) -> Result<ServerConfig, BalancerError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| BalancerError::TlsSetup(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer =
        provider::Ticketer::new().map_err(|e| BalancerError::TlsSetup(e.to_string()))?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn self_signed_is_generated_once_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["tandem.test".to_string(), "10.88.0.10".to_string()];
        let (c, k) = ensure_self_signed(dir.path(), &names).unwrap();
        let mode = fs::metadata(&k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = fs::read(&c).unwrap();
        let again = ensure_self_signed(dir.path(), &names).unwrap();
        assert_eq!(again, (c.clone(), k.clone()));
        assert_eq!(fs::read(&c).unwrap(), first, "regenerated");
        load_certified_key(&c, &k).unwrap();
    }

    #[test]
    fn bad_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pem");
        fs::write(&p, "not pem").unwrap();
        let e = load_certified_key(&p, &p).unwrap_err().to_string();
        assert!(e.contains("x.pem"), "{e}");
        let e = load_certified_key(&dir.path().join("missing.crt"), &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.crt"), "{e}");
    }
}
