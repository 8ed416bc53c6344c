//! TLS for the registry client: rustls with the system's CA certificates, the webpki roots,
//! and each registry's configured `ca_file`, where the system's certificates are read only
//! when the first certificate is verified.
//!
//! Reading them costs a pull from a plain-HTTP registry (loopback, or `insecure = true`)
//! tens of milliseconds for nothing: `/etc/ssl/certs` holds ~150 files, read cold after a
//! reboot, and every certificate is parsed. Go's crypto/x509 defers them the same way.

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The certificates in a PEM file, each checked to be a usable trust anchor. `Err` says
/// what is wrong, for a message that names the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    let mut check = RootCertStore::empty();
    for c in &certs {
        check
            .add(c.clone())
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(certs)
}

/// A client configuration trusting the webpki roots, the system's CA certificates and
/// `extra`, with ALPN for HTTP/2 and HTTP/1.1 (what reqwest sets up by itself).
pub fn client_config(extra: Vec<CertificateDer<'static>>) -> Result<ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(LazyRoots {
        provider: provider.clone(),
        extra,
        inner: OnceLock::new(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// rustls's own webpki verifier, built on first use. Only certificate-chain verification
/// needs the roots; handshake signatures are checked as webpki's verifier checks them.
#[derive(Debug)]
struct LazyRoots {
    provider: Arc<CryptoProvider>,
    extra: Vec<CertificateDer<'static>>,
    inner: OnceLock<Result<Arc<WebPkiServerVerifier>, String>>,
}

impl LazyRoots {
    fn verifier(&self) -> Result<&Arc<WebPkiServerVerifier>, rustls::Error> {
        self.inner
            .get_or_init(|| {
                let mut roots = RootCertStore::empty();
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                // like reqwest: a system store often holds a few certificates webpki cannot
                // parse (ancient roots); those are skipped
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                roots.add_parsable_certificates(self.extra.iter().cloned());
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| format!("setting up certificate verification: {e}"))
            })
            .as_ref()
            .map_err(|m| rustls::Error::General(m.clone()))
    }
}

impl ServerCertVerifier for LazyRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_a_usable_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(read_ca_file(&missing).is_err());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = read_ca_file(&empty).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        // well-formed PEM whose contents are not a certificate
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_ca_file(&junk).unwrap_err();
        assert!(e.contains("not a usable CA certificate"), "{e}");
    }

    #[test]
    fn the_system_roots_wait_for_the_first_verification() {
        let config = client_config(Vec::new()).unwrap();
        assert_eq!(config.alpn_protocols[0], b"h2");
        let verifier = LazyRoots {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            extra: Vec::new(),
            inner: OnceLock::new(),
        };
        assert!(!verifier.supported_verify_schemes().is_empty());
        assert!(verifier.inner.get().is_none());
        // a certificate that is not one: refused, and the roots are loaded by then
        let bogus = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let name = ServerName::try_from("registry.example").unwrap();
        let r = verifier.verify_server_cert(&bogus, &[], &name, &[], UnixTime::now());
        assert!(r.is_err());
        assert!(matches!(verifier.inner.get(), Some(Ok(_))));
    }
}
