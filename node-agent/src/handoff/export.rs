//! The source side: check every socket, check the migration, dump, send the package to the
//! destination agent; on any failure after a dump, the sockets leave repair mode again.

use std::{
    net::{IpAddr, Ipv4Addr, TcpStream},
    os::fd::OwnedFd,
    time::Instant,
};

use ferry_tcp_repair::TcpState;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use super::{Ctx, HandoffError, Package, ms, peer, wire};

/// The header of an export request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportRequest {
    /// "export" (dispatched on before this is parsed).
    #[serde(rename = "op")]
    _op: String,
    container: Ipv4Addr,
    to: String,
    /// How many sockets the message carries (framing).
    fds: usize,
    /// The state's length (framing: the payload was read by it).
    #[serde(default, rename = "state_len")]
    _state_len: usize,
}

pub async fn export(ctx: &Ctx, msg: wire::Message) -> Result<Value, HandoffError> {
    let req: ExportRequest = serde_json::from_value(msg.header)
        .map_err(|e| HandoffError::new("bad_request", format!("export: {e}")))?;
    let (c, fds, state) = (req.container, msg.fds, msg.payload);
    if fds.len() != req.fds {
        return Err(HandoffError::new(
            "wrong_fd_count",
            format!(
                "the header announces {} sockets (`fds`) and {} arrived",
                req.fds,
                fds.len()
            ),
        ));
    }
    if req.to == ctx.host {
        return Err(HandoffError::new(
            "bad_request",
            format!("`to` is this host ({}): nothing to move", ctx.host),
        ));
    }
    ctx.local_netns(c).await?;
    let c6 = ctx.overlay6.map(|p| ferry_config::overlay_ipv6(p, c));
    let fds = check_all(c, c6, fds)?;
    let token = ctx.token()?.to_owned();
    let dest = ctx.destination(&req.to).await?;
    ctx.require_frozen(c, &req.to).await?;

    // From here the sockets change: every failure below puts them back.
    let t0 = Instant::now();
    let (fds, dumped) = tokio::task::spawn_blocking(move || dump_all(fds))
        .await
        .map_err(|e| HandoffError::new("internal", format!("the dump task failed: {e}")))?;
    let sockets = dumped?;
    let dump_time = t0.elapsed();
    // The old copy's connections are gone from here: drop what it still emits.
    ctx.node.lock().await.mark_dumped(c, true);
    let n = sockets.len();
    let package = Package {
        container: c,
        from: ctx.host.clone(),
        sockets,
        state,
    };
    let t1 = Instant::now();
    let sent = peer::send_package(dest, &token, &package).await;
    let transfer_time = t1.elapsed();
    let stored = match sent {
        Ok(stored) => stored,
        Err(e) => {
            let aborted = tokio::task::spawn_blocking(move || abort_all(&fds)).await;
            ctx.node.lock().await.mark_dumped(c, false);
            let failed = aborted.unwrap_or_else(|e| vec![format!("the abort task failed: {e}")]);
            if let Err(w) = peer::withdraw(dest, &token, c).await {
                warn!(%c, error = %w, "withdrawing the package from the destination (it may have none)");
            }
            let resumed = if failed.is_empty() {
                "every socket left repair mode and carries on here".to_owned()
            } else {
                format!("leaving repair mode failed for: {}", failed.join("; "))
            };
            return Err(HandoffError::new(
                "transfer_failed",
                format!("sending the package to {} ({dest}): {e}; {resumed}", req.to),
            ));
        }
    };
    // Our copies close here: in repair mode, silently.
    drop(fds);
    Ok(json!({
        "ok": true,
        "container": c.to_string(),
        "to": req.to,
        "sockets": n,
        "state_bytes": package.state.len(),
        "package_bytes": stored.get("bytes").cloned().unwrap_or(Value::Null),
        "dump_ms": ms(dump_time),
        "transfer_ms": ms(transfer_time),
    }))
}

/// Every socket must be a movable TCP connection of the container's own address (IPv4, or its
/// IPv6 address `container6` on a dual-stack overlay); nothing is changed. The first offender
/// is named.
fn check_all(
    container: Ipv4Addr,
    container6: Option<std::net::Ipv6Addr>,
    fds: Vec<OwnedFd>,
) -> Result<Vec<OwnedFd>, HandoffError> {
    let n = fds.len();
    for (i, fd) in fds.iter().enumerate() {
        if let Err(e) = ferry_tcp_repair::check(fd) {
            return Err(HandoffError::new(
                "not_movable",
                format!("socket {i} (of {n}) cannot move: {e}; nothing was changed"),
            )
            .at_socket(i));
        }
    }
    let mut out = Vec::with_capacity(n);
    for (i, fd) in fds.into_iter().enumerate() {
        let s = TcpStream::from(fd);
        let local = s.local_addr().map_err(|e| {
            HandoffError::new("not_movable", format!("socket {i}: getsockname: {e}")).at_socket(i)
        })?;
        let own = match local.ip() {
            IpAddr::V4(v4) => v4 == container,
            IpAddr::V6(v6) => v6.to_ipv4_mapped() == Some(container) || Some(v6) == container6,
        };
        if !own {
            return Err(HandoffError::new(
                "not_movable",
                format!(
                    "socket {i} (of {n}) is bound to {local}, not to the container's address \
                     {container}: only the container's own connections move; nothing was changed"
                ),
            )
            .at_socket(i));
        }
        out.push(OwnedFd::from(s));
    }
    Ok(out)
}

/// Dumps every socket. If one fails, those already dumped leave repair mode again.
fn dump_all(fds: Vec<OwnedFd>) -> (Vec<OwnedFd>, Result<Vec<TcpState>, HandoffError>) {
    let mut states = Vec::with_capacity(fds.len());
    for (i, fd) in fds.iter().enumerate() {
        match ferry_tcp_repair::dump(fd) {
            Ok(s) => states.push(s),
            Err(e) => {
                let failed = abort_all(&fds[..i]);
                let rolled = if failed.is_empty() {
                    format!("the {i} sockets dumped before it left repair mode again")
                } else {
                    format!("leaving repair mode failed for: {}", failed.join("; "))
                };
                let err = HandoffError::new(
                    "dump_failed",
                    format!("dumping socket {i} (of {}): {e}; {rolled}", fds.len()),
                )
                .at_socket(i);
                return (fds, Err(err));
            }
        }
    }
    (fds, Ok(states))
}

/// Takes dumped sockets out of repair mode; returns what failed.
fn abort_all(fds: &[OwnedFd]) -> Vec<String> {
    fds.iter()
        .enumerate()
        .filter_map(|(i, fd)| {
            ferry_tcp_repair::abort_dump(fd)
                .err()
                .map(|e| format!("socket {i}: {e}"))
        })
        .collect()
}
