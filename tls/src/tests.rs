use std::net::{IpAddr, Ipv4Addr};

use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};

use super::*;

const IP1: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 10));
const IP2: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 11));

struct Cluster {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ca: Ca,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let ca = Ca::generate("test CA", Validity::days(30)).unwrap();
        Self {
            _dir: dir,
            root,
            ca,
        }
    }

    fn party(&self, name: &str, id: Identity, ips: &[IpAddr], v: Validity) -> TlsFiles {
        let issued = self.ca.issue(&id, ips, v).unwrap();
        write_party(&self.root.join(name), &self.ca, &issued).unwrap()
    }

    fn tls(&self, name: &str, id: Identity, ips: &[IpAddr]) -> Tls {
        Tls::load(&self.party(name, id, ips, Validity::days(1))).unwrap()
    }
}

/// Runs a handshake in memory; `Ok(the identity the server saw)` or the first side's error.
fn handshake(client: &Tls, server: &Tls, to: IpAddr) -> Result<Identity, String> {
    let mut c = ClientConnection::new(client.client_config(), ServerName::IpAddress(to.into()))
        .map_err(|e| e.to_string())?;
    let mut s = ServerConnection::new(server.server_config()).map_err(|e| e.to_string())?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            let certs = s.peer_certificates().ok_or("no client certificate")?;
            return Identity::of_certificate(&certs[0]).map_err(|e| e.to_string());
        }
    }
    Err("the handshake did not finish".into())
}

#[test]
fn identities_round_trip_and_bad_ones_are_nobody() {
    for id in [
        Identity::Operator,
        Identity::Gateway,
        Identity::Host("b1".into()),
        Identity::Host("a-very-long-host-name-of-32-char".into()),
    ] {
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
    }
    for bad in [
        "spiffe://ferry/host/",
        "spiffe://ferry/host/B1",
        "spiffe://ferry/host/../gateway",
        "spiffe://ferry/host/b1/x",
        "spiffe://other/operator",
        "spiffe://ferryx/operator",
        "https://ferry/operator",
        "spiffe://ferry/host/-b",
        "spiffe://ferry/host/a-very-long-host-name-of-33-chars",
    ] {
        assert_eq!(Identity::from_uri(bad), None, "{bad}");
    }
    assert!(Identity::host("b/1").is_err());
}

#[test]
fn a_cluster_handshakes_and_the_server_learns_who_called() {
    let c = Cluster::new();
    let gw = c.tls("gw", Identity::Gateway, &[IP1]);
    let b1 = c.tls("b1", Identity::Host("b1".into()), &[IP2]);
    let op = c.tls("op", Identity::Operator, &[]);
    assert_eq!(gw.identity(), &Identity::Gateway);
    assert_eq!(handshake(&b1, &gw, IP1), Ok(Identity::Host("b1".into())));
    assert_eq!(handshake(&op, &gw, IP1), Ok(Identity::Operator));
    assert_eq!(handshake(&gw, &b1, IP2), Ok(Identity::Gateway));
}

#[test]
fn a_server_reached_at_an_address_its_certificate_does_not_name_is_refused() {
    let c = Cluster::new();
    let gw = c.tls("gw", Identity::Gateway, &[IP1]);
    let b1 = c.tls("b1", Identity::Host("b1".into()), &[IP2]);
    let e = handshake(&b1, &gw, IP2).unwrap_err();
    assert!(e.starts_with("client:") && e.contains("certificate"), "{e}");
}

#[test]
fn another_clusters_certificates_are_refused_both_ways() {
    let ours = Cluster::new();
    let theirs = Cluster::new();
    let gw = ours.tls("gw", Identity::Gateway, &[IP1]);
    let intruder = theirs.tls("op", Identity::Operator, &[]);
    let e = handshake(&intruder, &gw, IP1).unwrap_err();
    // The client does not trust our server; and our server would not trust it either.
    assert!(
        e.contains("UnknownIssuer") || e.contains("BadSignature"),
        "{e}"
    );
    let fake_gw = theirs.tls("gw", Identity::Gateway, &[IP1]);
    let op = ours.tls("op", Identity::Operator, &[]);
    let e = handshake(&op, &fake_gw, IP1).unwrap_err();
    assert!(e.starts_with("client:"), "{e}");
}

#[test]
fn an_expired_certificate_is_refused_at_load_and_in_a_handshake() {
    let c = Cluster::new();
    let now = SystemTime::now();
    let past = Validity {
        not_before: now - Duration::from_secs(10 * 86_400),
        not_after: now - Duration::from_secs(86_400),
    };
    let files = c.party("old", Identity::Operator, &[], past);
    let e = Tls::load(&files).unwrap_err().to_string();
    assert!(e.contains("expired") && e.contains("cert.pem"), "{e}");

    // A peer that does not check at load: the server refuses it in the handshake.
    let gw = c.tls("gw", Identity::Gateway, &[IP1]);
    let mut old = c.tls("old2", Identity::Operator, &[]);
    let issued = c.ca.issue(&Identity::Operator, &[], past).unwrap();
    let chain = vec![
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .unwrap()
            .into_owned(),
    ];
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(c.ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    old.client = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    );
    let e = handshake(&old, &gw, IP1).unwrap_err();
    assert!(e.starts_with("server:") && e.contains("expired"), "{e}");
}

#[test]
fn keys_readable_by_others_and_certificates_without_identity_are_refused() {
    let c = Cluster::new();
    let files = c.party("b1", Identity::Host("b1".into()), &[IP2], Validity::days(1));
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Tls::load(&files).unwrap_err().to_string();
    assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Tls::load(&files).is_ok());

    // A certificate from the same CA without a ferry URI names nobody.
    let mut p = rcgen::CertificateParams::new(vec!["example.org".into()]).unwrap();
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    let k = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&k, &c.ca.cert, &c.ca.key).unwrap();
    let e = Identity::of_certificate(cert.der())
        .unwrap_err()
        .to_string();
    assert!(e.contains("names no ferry identity"), "{e}");

    let e = Tls::load(&TlsFiles::in_dir(&c.root.join("nobody")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca.pem") && e.contains("No such file"), "{e}");
}

#[test]
fn the_files_have_safe_modes_and_a_saved_ca_issues_certificates_that_chain() {
    let c = Cluster::new();
    let files = c.party("b1", Identity::Host("b1".into()), &[IP2], Validity::days(1));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(&files.cert), 0o644);
    assert_eq!(mode(&c.root.join("b1")), 0o700);

    let ca_dir = c.root.join("ca");
    c.ca.save(&ca_dir).unwrap();
    assert_eq!(mode(&ca_dir.join("ca-key.pem")), 0o600);
    let again = Ca::load(&ca_dir).unwrap();
    // A host issued by the reloaded CA talks to a gateway issued by the original one.
    let issued = again
        .issue(&Identity::Host("b2".into()), &[IP2], Validity::days(1))
        .unwrap();
    // ca.pem of the party: the original CA certificate.
    std::fs::write(c.root.join("orig-ca.pem"), c.ca.cert_pem()).unwrap();
    let dir = c.root.join("b2");
    write_party(&dir, &again, &issued).unwrap();
    std::fs::copy(c.root.join("orig-ca.pem"), dir.join("ca.pem")).unwrap();
    let b2 = Tls::load_dir(&dir).unwrap();
    let gw = c.tls("gw", Identity::Gateway, &[IP1]);
    assert_eq!(handshake(&b2, &gw, IP1), Ok(Identity::Host("b2".into())));
    assert!(format!("{issued:?}").contains("<redacted>"));
}
