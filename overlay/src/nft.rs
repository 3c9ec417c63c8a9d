//! The one nftables rule ferry needs: on the gateway, masquerade containers that have no
//! public address (those with one are translated statelessly by the datapath before the stack
//! sees them). Applied with `nft -f -` in the calling process's network namespace, in a table
//! of ferry's own that is replaced whole and removed on exit.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use ipnet::Ipv4Net;

/// ferry's nftables table (family `ip`).
pub const TABLE: &str = "ferry";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft {what} failed: {stderr}")]
    Failed { what: &'static str, stderr: String },
}

fn nft(script: &str, what: &'static str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(NftError::Spawn)?;
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed {
            what,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The ruleset text (pure, for tests).
pub fn masquerade_ruleset(overlay: Ipv4Net, out_interface: &str) -> String {
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {overlay} oifname \"{out_interface}\" counter masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Installs (or replaces) the masquerade rule.
pub fn ensure_masquerade(overlay: Ipv4Net, out_interface: &str) -> Result<(), NftError> {
    nft(&masquerade_ruleset(overlay, out_interface), "masquerade")
}

/// Removes ferry's table (no error if absent).
pub fn remove() -> Result<(), NftError> {
    nft(
        &format!("table ip {TABLE}\ndelete table ip {TABLE}\n"),
        "delete table",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_the_table_and_names_the_interface() {
        let r = masquerade_ruleset("10.244.0.0/16".parse().unwrap(), "pub");
        assert!(r.starts_with("table ip ferry\ndelete table ip ferry\n"));
        assert!(r.contains("ip saddr 10.244.0.0/16 oifname \"pub\" counter masquerade"));
    }
}
