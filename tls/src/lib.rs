//! ferry's TLS: every control connection (CLI → gateway, agent → gateway, gateway → agent,
//! agent → agent) is TLS 1.3 with a certificate on both sides, issued by the cluster's own CA.
//!
//! - **Identities.** A certificate names exactly one party in a URI subject-alternative name:
//!   `spiffe://ferry/operator`, `spiffe://ferry/gateway` or `spiffe://ferry/host/<name>`
//!   ([`Identity`]). A server's certificate also carries the IP addresses it is reached at, which
//!   the client checks (the agents' peer API at the host's underlay address, the gateway's API
//!   at its own).
//! - **Files.** Each party has a directory with `ca.pem` (the CA's certificate), `cert.pem` and
//!   `key.pem` (0600: refused otherwise) — [`TlsFiles`]. `ferry certs` and the lab write them
//!   ([`Ca`], [`write_party`]).
//! - **Configurations.** [`Tls::load`] reads a party's files and builds both rustls
//!   configurations: the server's requires a client certificate from the CA, the client's
//!   presents its own. [`Identity::of_certificate`] names the peer of an accepted connection,
//!   which the servers' authorisation layers then check.
//!
//! The crypto provider is *ring* (aws-lc-rs would need cmake and a much longer cold build).

use std::{
    fmt,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, Serialize};

/// The trust domain in every identity URI.
pub const TRUST_DOMAIN: &str = "ferry";
/// Longest host name an identity carries (the registry's rule: `[a-z0-9-]`, 1–32).
const HOST_NAME_MAX: usize = 32;

/// Who is at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// The operator's or orchestrator's CLI: the whole gateway API.
    Operator,
    /// The gateway: drives migrations, calls the agents' peer APIs.
    Gateway,
    /// The agent of one host: acts only as that host.
    Host(String),
}

impl Identity {
    /// `spiffe://ferry/...`.
    pub fn uri(&self) -> String {
        match self {
            Self::Operator => format!("spiffe://{TRUST_DOMAIN}/operator"),
            Self::Gateway => format!("spiffe://{TRUST_DOMAIN}/gateway"),
            Self::Host(h) => format!("spiffe://{TRUST_DOMAIN}/host/{h}"),
        }
    }

    /// The identity a URI names, if it is one of ferry's.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri
            .strip_prefix("spiffe://")?
            .strip_prefix(TRUST_DOMAIN)?
            .strip_prefix('/')?;
        match rest {
            "operator" => Some(Self::Operator),
            "gateway" => Some(Self::Gateway),
            _ => {
                let h = rest.strip_prefix("host/")?;
                valid_host_name(h).then(|| Self::Host(h.to_owned()))
            }
        }
    }

    /// A host identity, if `name` is a valid host name.
    pub fn host(name: &str) -> Result<Self, TlsError> {
        if valid_host_name(name) {
            Ok(Self::Host(name.to_owned()))
        } else {
            Err(TlsError::BadHostName { name: name.into() })
        }
    }

    /// The one ferry identity a certificate (DER) names. A certificate naming none, or more
    /// than one, names nobody.
    pub fn of_certificate(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Parse {
            what: "a certificate".into(),
            reason: e.to_string(),
        })?;
        let mut found = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(u) = name
                    && let Some(id) = Self::from_uri(u)
                {
                    found.push(id);
                }
            }
        }
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(TlsError::NoIdentity {
                subject: cert.subject().to_string(),
            }),
            _ => Err(TlsError::ManyIdentities {
                subject: cert.subject().to_string(),
            }),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Operator => f.write_str("operator"),
            Self::Gateway => f.write_str("gateway"),
            Self::Host(h) => write!(f, "host {h}"),
        }
    }
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= HOST_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// What went wrong with TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} has mode {mode:04o}: a private key must not be readable by group or others \
         (chmod 600 {})",
        path.display(),
        path.display()
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("cannot parse {what}: {reason}")]
    Parse { what: String, reason: String },
    #[error("certificate {subject} names no ferry identity (spiffe://ferry/...)")]
    NoIdentity { subject: String },
    #[error("certificate {subject} names more than one ferry identity")]
    ManyIdentities { subject: String },
    #[error("{name:?} is not a host name ([a-z0-9-], 1–32 characters)")]
    BadHostName { name: String },
    #[error("{}: the certificate expired at {not_after} (issue a new one: ferry certs issue)", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("{}: the certificate is not valid before {not_before}", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("building the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
}

/// A party's files: the CA's certificate, its own certificate and private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `ca.pem`, `cert.pem` and `key.pem` in `dir` (what `ferry certs issue` writes).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// A party's loaded TLS material: its identity and both rustls configurations.
#[derive(Clone)]
pub struct Tls {
    identity: Identity,
    not_after: SystemTime,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.into(),
        source,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key, refusing a file that group or others may read.
fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Io {
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyMode {
            path: path.into(),
            mode,
        });
    }
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Pem {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// (not_before, not_after) of a certificate.
fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Parse {
        what: "a certificate".into(),
        reason: e.to_string(),
    })?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

impl Tls {
    /// Loads a party's files. Refuses a key readable by others, a certificate that names no
    /// (or several) ferry identities, and one that is expired or not yet valid — at start,
    /// with the file's name, rather than at the first handshake.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = certs(&files.ca)?;
        let chain = certs(&files.cert)?;
        let key = key(&files.key)?;
        let identity = Identity::of_certificate(&chain[0])?;
        let (not_before, not_after) = validity(&chain[0])?;
        let now = SystemTime::now();
        if now > not_after {
            return Err(TlsError::Expired {
                path: files.cert.clone(),
                not_after: rfc3339(not_after),
            });
        }
        if now < not_before {
            return Err(TlsError::NotYetValid {
                path: files.cert.clone(),
                not_before: rfc3339(not_before),
            });
        }
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        Ok(Self {
            identity,
            not_after,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// Loads the files in `dir` (see [`TlsFiles::in_dir`]).
    pub fn load_dir(dir: &Path) -> Result<Self, TlsError> {
        Self::load(&TlsFiles::in_dir(dir))
    }

    /// Who this party is (its own certificate's identity).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// When its certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }
}

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a minute ago (clocks differ a little) for `days`.
    pub fn days(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// The cluster's certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl Ca {
    /// A new CA (ECDSA P-256) named `name`.
    pub fn generate(name: &str, validity: Validity) -> Result<Self, TlsError> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_owned());
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "ferry");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = offset(validity.not_before);
        p.not_after = offset(validity.not_after);
        let key = rcgen::KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA kept in `dir` (`ca.pem`, `ca-key.pem`).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        // The mode check of every private key.
        key(&key_path)?;
        let text = |p: &Path| {
            String::from_utf8(read(p)?).map_err(|e| TlsError::Pem {
                path: p.into(),
                reason: e.to_string(),
            })
        };
        let key = rcgen::KeyPair::from_pem(&text(&key_path)?)?;
        let params = rcgen::CertificateParams::from_ca_cert_pem(&text(&cert_path)?)?;
        // Signed again with the same key and subject: leaves it signs chain to the file's
        // certificate.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Writes `ca.pem` (0644) and `ca-key.pem` (0600) into `dir` (made 0700 if missing).
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        make_dir(dir)?;
        write_file(&dir.join("ca.pem"), self.cert.pem().as_bytes(), 0o644)?;
        write_file(
            &dir.join("ca-key.pem"),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `identity`, valid for clients and servers, also naming `ips` (the
    /// addresses its servers are reached at).
    pub fn issue(
        &self,
        identity: &Identity,
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Issued, TlsError> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, identity.to_string());
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "ferry");
        p.subject_alt_names = vec![rcgen::SanType::URI(rcgen::Ia5String::try_from(
            identity.uri(),
        )?)];
        p.subject_alt_names
            .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = offset(validity.not_before);
        p.not_after = offset(validity.not_after);
        let key = rcgen::KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn make_dir(dir: &Path) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: dir.into(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Writes `data` to `path` with `mode`, atomically (a temporary file renamed over it), so a
/// reader never sees half a key and a key is never readable by others, not even for a moment.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes one party's directory: `ca.pem`, `cert.pem` (0644), `key.pem` (0600); the directory
/// 0700. Returns its [`TlsFiles`].
pub fn write_party(dir: &Path, ca: &Ca, issued: &Issued) -> Result<TlsFiles, TlsError> {
    make_dir(dir)?;
    let files = TlsFiles::in_dir(dir);
    write_file(&files.ca, ca.cert_pem().as_bytes(), 0o644)?;
    write_file(&files.cert, issued.cert_pem.as_bytes(), 0o644)?;
    write_file(&files.key, issued.key_pem.as_bytes(), 0o600)?;
    Ok(files)
}

#[cfg(test)]
mod tests;
