//! The destination side: wait for the package, restore its sockets inside the container's
//! network namespace (on a thread that enters it, never across an `.await`).

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use ferry_tcp_repair::TcpState;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use super::{Ctx, HandoffError, ms, store::StoreError, store::Taken, wire};

/// How long a claim waits for its package unless it says otherwise, and at most.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The header of a claim request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimRequest {
    /// "claim" (dispatched on before this is parsed).
    #[serde(rename = "op")]
    _op: String,
    container: Ipv4Addr,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Framing fields: a claim carries neither sockets nor state.
    #[serde(default)]
    fds: usize,
    #[serde(default)]
    state_len: usize,
}

/// Restored sockets waiting to be handed over, with the package they came from.
pub struct Restored {
    pub taken: Taken,
    pub fds: Vec<OwnedFd>,
    pub reply: Value,
}

pub async fn claim(ctx: &Ctx, msg: wire::Message) -> Result<Restored, HandoffError> {
    let req: ClaimRequest = serde_json::from_value(msg.header)
        .map_err(|e| HandoffError::new("bad_request", format!("claim: {e}")))?;
    if req.fds != 0 || req.state_len != 0 || !msg.fds.is_empty() || !msg.payload.is_empty() {
        return Err(HandoffError::new(
            "bad_request",
            "a claim carries no sockets and no state",
        ));
    }
    let c = req.container;
    let netns = ctx.local_netns(c).await?;
    let wait = req
        .timeout_ms
        .map_or(DEFAULT_WAIT, Duration::from_millis)
        .min(MAX_WAIT);
    let taken = ctx.store.take(c, wait).await.map_err(|e| {
        let code = match e {
            StoreError::NoPackage { .. } => "no_package",
            StoreError::AlreadyClaimed { .. } => "already_claimed",
            StoreError::BeingClaimed(_) => "being_claimed",
            StoreError::Full { .. } => "internal",
        };
        HandoffError::new(code, e.to_string())
    })?;

    let t0 = Instant::now();
    let states = taken.package.sockets.clone();
    let result = tokio::task::spawn_blocking(move || restore_in(netns, states)).await;
    let restore_time = t0.elapsed();
    let fds = match result {
        Ok(Ok(fds)) => fds,
        Ok(Err(e)) => {
            ctx.store.put_back(taken);
            return Err(e);
        }
        Err(e) => {
            ctx.store.put_back(taken);
            return Err(HandoffError::new(
                "internal",
                format!("the restore task failed: {e}"),
            ));
        }
    };
    let p = &taken.package;
    let reply = json!({
        "ok": true,
        "container": c.to_string(),
        "from": p.from,
        "sockets": fds.len(),
        "fds": fds.len(),
        "state_len": p.state.len(),
        "restore_ms": ms(restore_time),
        "waited_ms": ms(taken.waited),
    });
    Ok(Restored { taken, fds, reply })
}

/// Restores every socket inside `netns`, in order. If one fails, those already restored are
/// silenced and closed, so the peers see nothing.
fn restore_in(netns: PathBuf, states: Vec<TcpState>) -> Result<Vec<OwnedFd>, HandoffError> {
    let n = states.len();
    let in_ns = ferry_overlay::netns::run_in(&netns, move || {
        let mut fds = Vec::with_capacity(states.len());
        for (i, st) in states.iter().enumerate() {
            match ferry_tcp_repair::restore(st) {
                Ok(fd) => fds.push(fd),
                Err(e) => {
                    silence(&fds);
                    return Err((i, st.local, st.peer, e));
                }
            }
        }
        Ok(fds)
    });
    match in_ns {
        Ok(Ok(fds)) => Ok(fds),
        Ok(Err((i, local, peer, e))) => Err(HandoffError::new(
            "restore_failed",
            format!(
                "restoring socket {i} (of {n}, {local} ↔ {peer}): {e}; the sockets restored \
                 before it were closed silently and the package can be claimed again"
            ),
        )
        .at_socket(i)),
        Err(e) => Err(HandoffError::new(
            "restore_failed",
            format!("{e}; the package can be claimed again"),
        )),
    }
}

/// Puts live sockets back into repair mode, so closing them sends neither FIN nor RST.
pub fn silence(fds: &[OwnedFd]) {
    let on: libc::c_int = 1;
    for fd in fds {
        // SAFETY: `fd` is an open socket we own; the option value is a c_int that lives for
        // the call and whose size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_REPAIR,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            warn!(error = %std::io::Error::last_os_error(), "TCP_REPAIR on a restored socket: closing it may reach the peer");
        }
    }
}
