//! Client of the node agent's socket hand-off API (a Unix socket, see [`crate::wire`]):
//! `export` on the source host, `claim` on the destination host. One request per connection.

use std::{
    fmt,
    net::Ipv4Addr,
    os::{
        fd::{BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

use serde_json::{Value, json};

use crate::wire;

/// Largest state (payload) a reply may carry; the agent has the same limit.
pub const MAX_STATE_LEN: usize = 64 * 1024 * 1024;
/// How long an export may take (dump, transfer to the destination agent, its answer).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// A refusal from the agent (`{"ok":false,"error":{"code","message"}}`), or a local failure
/// (code `io`: the agent could not be reached or the exchange broke).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffError {
    pub code: String,
    pub message: String,
}

impl HandoffError {
    fn io(what: impl fmt::Display, e: impl fmt::Display) -> Self {
        Self {
            code: "io".into(),
            message: format!("{what}: {e}"),
        }
    }

    /// `{"code":..,"message":..}`.
    pub fn to_json(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }
}

impl fmt::Display for HandoffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for HandoffError {}

/// Sends one request and returns the reply, or the agent's error.
pub fn request(
    socket: &Path,
    header: &Value,
    fds: &[BorrowedFd<'_>],
    payload: &[u8],
    timeout: Duration,
) -> Result<wire::Message, HandoffError> {
    let s = UnixStream::connect(socket)
        .map_err(|e| HandoffError::io(format_args!("connecting to {}", socket.display()), e))?;
    let io = |e: &dyn fmt::Display| {
        HandoffError::io(
            format_args!("talking to the agent at {}", socket.display()),
            e,
        )
    };
    s.set_read_timeout(Some(timeout)).map_err(|e| io(&e))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| io(&e))?;
    wire::send_message(&s, header, fds, payload).map_err(|e| io(&e))?;
    let reply = wire::recv_message(&s, MAX_STATE_LEN).map_err(|e| io(&e))?;
    if reply.header.get("ok") == Some(&Value::Bool(true)) {
        return Ok(reply);
    }
    let err = reply.header.get("error");
    let field = |name: &str| {
        err.and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Err(HandoffError {
        code: Some(field("code"))
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "bad_reply".into()),
        message: Some(field("message"))
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| format!("the agent answered {}", reply.header)),
    })
}

/// Hands `fds` (established TCP sockets, in this order) and `state` to the agent for
/// container `container`, to be moved to host `to`. On success the sockets are in repair mode
/// (silent): close them and exit. On an error they are as they were: carry on.
pub fn export(
    socket: &Path,
    container: Ipv4Addr,
    to: &str,
    fds: &[BorrowedFd<'_>],
    state: &[u8],
) -> Result<Value, HandoffError> {
    let header = json!({
        "op": "export",
        "container": container.to_string(),
        "to": to,
        "fds": fds.len(),
        "state_len": state.len(),
    });
    request(socket, &header, fds, state, EXPORT_TIMEOUT).map(|m| m.header)
}

/// What a claim returns: the agent's reply, the restored sockets (in the exported order) and
/// the exported state.
#[derive(Debug)]
pub struct Claimed {
    pub reply: Value,
    pub fds: Vec<OwnedFd>,
    pub state: Vec<u8>,
}

/// Claims the package exported for `container`, waiting up to `timeout_ms` for it to arrive.
pub fn claim(socket: &Path, container: Ipv4Addr, timeout_ms: u64) -> Result<Claimed, HandoffError> {
    let header =
        json!({"op": "claim", "container": container.to_string(), "timeout_ms": timeout_ms});
    let timeout = Duration::from_millis(timeout_ms) + EXPORT_TIMEOUT;
    let m = request(socket, &header, &[], &[], timeout)?;
    let (announced, _) = wire::counts(&m.header).map_err(|e| HandoffError {
        code: "bad_reply".into(),
        message: e.to_string(),
    })?;
    if announced != m.fds.len() {
        return Err(HandoffError {
            code: "wrong_fd_count".into(),
            message: format!(
                "the agent announced {announced} sockets and sent {}",
                m.fds.len()
            ),
        });
    }
    Ok(Claimed {
        reply: m.header,
        fds: m.fds,
        state: m.payload,
    })
}
