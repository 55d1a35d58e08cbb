//! Mutual TLS on the control API: a client with a certificate from the
//! controller's CA (and the token) gets through; a client with no
//! certificate, one from another CA, or plain HTTP/2 does not.

mod common;

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use vrio_control::client::connect_with;
use vrio_control::pb;
use vrio_control::server::ServeOptions;
use vrio_control::tls::{ClientTls, ServerTls, TlsFiles};
use vrio_control::ControllerConfig;

const TOKEN: &str = "tls-test-token";

/// A CA, and leaf certificates it signs, written as PEM files in `dir`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem()).unwrap();
        Ca { issuer }
    }

    /// Writes `<name>.pem` and `<name>.key` for a leaf with these names.
    fn leaf(&self, dir: &Path, ca_name: &str, name: &str, sans: &[&str]) -> TlsFiles {
        let key = KeyPair::generate().unwrap();
        let p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let f = TlsFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{ca_name}-ca.pem")),
        };
        std::fs::write(&f.cert, cert.pem()).unwrap();
        std::fs::write(&f.key, key.serialize_pem()).unwrap();
        f
    }
}

async fn start(tls: ServerTls) -> (String, tokio::sync::oneshot::Sender<()>) {
    let opts = ServeOptions {
        token: Some(TOKEN.into()),
        tick: Duration::from_millis(50),
        rebalance_every: None,
        tls: Some(tls),
    };
    common::start(ControllerConfig::default(), opts).await
}

/// A Stats call over the given TLS setup: Ok, or the error's text.
async fn stats(addr: &str, tls: Option<&ClientTls>) -> Result<u32, String> {
    let mut c = connect_with(addr, Some(TOKEN), tls)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let r = tokio::time::timeout(Duration::from_secs(10), c.stats(pb::StatsRequest {}))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|s| format!("{s:?}"))?;
    Ok(r.into_inner().servers)
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_controllers_ca_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "vrio");
    let rogue = Ca::new(d, "rogue");
    let server = ca.leaf(d, "vrio", "controller", &["localhost", "127.0.0.1"]);
    let operator = ca.leaf(d, "vrio", "operator", &["operator"]);
    let mallory = rogue.leaf(d, "rogue", "mallory", &["operator"]);
    let (addr, stop) = start(ServerTls::load(&server).unwrap()).await;

    // A certificate the controller's CA signed, and the token: in.
    let good = ClientTls::load(&operator, "localhost").unwrap();
    assert_eq!(stats(&addr, Some(&good)).await, Ok(0));

    // No client certificate: the handshake fails.
    let anon = ClientTls::anonymous(&server.ca, "localhost").unwrap();
    let e = stats(&addr, Some(&anon)).await.unwrap_err();
    println!("no client certificate: {e}");
    assert!(e.contains("CertificateRequired"), "{e}");

    // A certificate from another CA: refused.
    let mallory = TlsFiles {
        ca: server.ca.clone(),
        ..mallory
    };
    let bad = ClientTls::load(&mallory, "localhost").unwrap();
    let e = stats(&addr, Some(&bad)).await.unwrap_err();
    println!("certificate from another CA: {e}");
    assert!(e.contains("UnknownCA"), "{e}");

    // Plain HTTP/2 to a TLS port: refused.
    let e = stats(&addr, None).await.unwrap_err();
    println!("plaintext: {e}");

    // The client checks the controller too: a controller certificate that
    // does not name what we dial is refused.
    let wrong_name = ClientTls::load(&operator, "elsewhere.example").unwrap();
    let e = stats(&addr, Some(&wrong_name)).await.unwrap_err();
    println!("wrong controller name: {e}");
    assert!(e.contains("NotValidForName"), "{e}");

    // The honest client still works after all that.
    assert_eq!(stats(&addr, Some(&good)).await, Ok(0));
    let _ = stop.send(());
}

#[test]
fn unreadable_or_non_pem_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = TlsFiles {
        cert: dir.path().join("nope.pem"),
        key: dir.path().join("nope.key"),
        ca: dir.path().join("nope-ca.pem"),
    };
    let e = ServerTls::load(&missing).unwrap_err().to_string();
    assert!(
        e.contains("cannot read certificate") && e.contains("nope.pem"),
        "{e}"
    );
    std::fs::write(&missing.cert, "not a certificate").unwrap();
    let e = ClientTls::load(&missing, "localhost")
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not PEM"), "{e}");
}
