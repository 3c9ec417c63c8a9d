//! `ferry certs`: the cluster's CA and each party's certificate (see `ferry-tls`).

use crate::commands::{CliError, Outcome};

/// `ferry certs init|issue`.
pub fn run(cmd: crate::cli::CertsCommand) -> Result<Outcome, CliError> {
    use crate::cli::CertsCommand;
    use ferry_tls::{Ca, Identity, Validity};
    let tls = |e: ferry_tls::TlsError| CliError::new("tls", e.to_string());
    match cmd {
        CertsCommand::Init { dir, days } => {
            if dir.join("ca-key.pem").exists() {
                return Err(CliError::new(
                    "conflict",
                    format!(
                        "{} already holds a CA: issuing from it keeps the cluster's trust; \
                         remove it first to start a new one",
                        dir.display()
                    ),
                ));
            }
            let ca = Ca::generate("ferry cluster CA", Validity::days(days)).map_err(tls)?;
            ca.save(&dir).map_err(tls)?;
            Outcome::new(
                serde_json::json!({"ca": dir.join("ca.pem"), "key": dir.join("ca-key.pem"), "days": days}),
                format!(
                    "CA written to {} (ca.pem; ca-key.pem is 0600: keep it off the hosts)",
                    dir.display()
                ),
            )
        }
        CertsCommand::Issue {
            ca_dir,
            out,
            party,
            ip,
            days,
        } => {
            let identity = match party.as_str() {
                "operator" => Identity::Operator,
                "gateway" => Identity::Gateway,
                p => match p.strip_prefix("host:") {
                    Some(h) => Identity::host(h).map_err(tls)?,
                    None => {
                        return Err(CliError::new(
                            "usage",
                            format!("{p:?}: name the party as operator, gateway or host:NAME"),
                        ));
                    }
                },
            };
            if matches!(identity, Identity::Gateway | Identity::Host(_)) && ip.is_empty() {
                return Err(CliError::new(
                    "usage",
                    format!("{identity} serves an API: give --ip (the address it is reached at)"),
                ));
            }
            let ca = Ca::load(&ca_dir).map_err(tls)?;
            let issued = ca
                .issue(&identity, &ip, Validity::days(days))
                .map_err(tls)?;
            let files = ferry_tls::write_party(&out, &ca, &issued).map_err(tls)?;
            Outcome::new(
                serde_json::json!({
                    "identity": identity.uri(), "ips": ip, "days": days,
                    "ca": files.ca, "cert": files.cert, "key": files.key,
                }),
                format!("{identity}: {} (key 0600)", out.display()),
            )
        }
    }
}
