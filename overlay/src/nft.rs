//! The one nftables rule ferry needs: on the gateway, masquerade containers that have no
//! public address (those with one are translated statelessly by the datapath before the stack
//! sees them), and on a dual-stack overlay whose IPv6 prefix is not routed publicly, their
//! IPv6 too. Applied with `nft -f -` in the calling process's network namespace, in a table
//! of ferry's own that is replaced whole and removed on exit.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use ipnet::{Ipv4Net, Ipv6Net};

/// ferry's nftables table (family `inet`; before dual-stack it was `ip`, which is removed too).
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

/// Removes both families' tables (declaring first: deleting an absent table is an error).
fn reset() -> String {
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table inet {TABLE}\n\
         delete table inet {TABLE}\n"
    )
}

/// The ruleset text (pure, for tests): IPv4 from `overlay` and, if given, IPv6 from `overlay6`
/// leaving by `out_interface` are masqueraded.
pub fn masquerade_ruleset(
    overlay: Ipv4Net,
    overlay6: Option<Ipv6Net>,
    out_interface: &str,
) -> String {
    let v6 = overlay6.map_or_else(String::new, |p| {
        format!("\t\tip6 saddr {p} oifname \"{out_interface}\" counter masquerade\n")
    });
    format!(
        "{}\
         table inet {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {overlay} oifname \"{out_interface}\" counter masquerade\n\
         {v6}\
         \t}}\n\
         }}\n",
        reset()
    )
}

/// Installs (or replaces) the masquerade rules.
pub fn ensure_masquerade(
    overlay: Ipv4Net,
    overlay6: Option<Ipv6Net>,
    out_interface: &str,
) -> Result<(), NftError> {
    nft(
        &masquerade_ruleset(overlay, overlay6, out_interface),
        "masquerade",
    )
}

/// Removes ferry's table (no error if absent).
pub fn remove() -> Result<(), NftError> {
    nft(&reset(), "delete table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_the_table_and_names_the_interface() {
        let r = masquerade_ruleset("10.244.0.0/16".parse().unwrap(), None, "pub");
        assert!(r.starts_with("table ip ferry\ndelete table ip ferry\n"));
        assert!(r.contains("table inet ferry\ndelete table inet ferry\ntable inet ferry {"));
        assert!(r.contains("ip saddr 10.244.0.0/16 oifname \"pub\" counter masquerade"));
        assert!(!r.contains("ip6"));
        let r = masquerade_ruleset(
            "10.244.0.0/16".parse().unwrap(),
            Some("2001:db8:f::/96".parse().unwrap()),
            "pub",
        );
        assert!(r.contains("ip6 saddr 2001:db8:f::/96 oifname \"pub\" counter masquerade"));
    }
}
