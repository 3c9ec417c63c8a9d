//! The Unix socket server: one request per connection, dispatched to export or claim, one
//! reply.

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{Instrument as _, debug, info, warn};

use super::{Ctx, HandoffError, MAX_STATE_LEN, claim, export, wire};

/// How long a client has to send its whole request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until `stop` turns true; then drops the requests in progress.
pub async fn serve(listener: UnixListener, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            // The only change ever sent is "stop" (an error: the sender is gone).
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(handle(ctx.clone(), stream).in_current_span());
                }
                Err(e) => {
                    warn!(error = %e, "accepting a hand-off connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

async fn reply_error(stream: &UnixStream, e: &HandoffError) {
    if let Err(err) = wire::send(stream, &e.to_json(), &[], &[]).await {
        debug!(error = %err, "answering a hand-off request");
    }
}

async fn handle(ctx: Arc<Ctx>, stream: UnixStream) {
    let msg = match tokio::time::timeout(READ_TIMEOUT, wire::recv(&stream, MAX_STATE_LEN)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let e = HandoffError::new("bad_request", format!("reading the request: {e}"));
            return reply_error(&stream, &e).await;
        }
        Err(_) => {
            let e = HandoffError::new(
                "bad_request",
                format!("no complete request within {} s", READ_TIMEOUT.as_secs()),
            );
            return reply_error(&stream, &e).await;
        }
    };
    let op = msg
        .header
        .get("op")
        .and_then(Value::as_str)
        .map(str::to_owned);
    match op.as_deref() {
        Some("export") => {
            let container = container_of(&msg.header);
            match export::export(&ctx, msg).await {
                Ok(reply) => {
                    info!(%container, %reply, "export done");
                    if let Err(e) = wire::send(&stream, &reply, &[], &[]).await {
                        // The package is at the destination; the sockets stay silent.
                        warn!(error = %e, "answering a successful export");
                    }
                }
                Err(e) => {
                    warn!(%container, code = e.code, error = %e.message, "export refused");
                    reply_error(&stream, &e).await;
                }
            }
        }
        Some("claim") => claim_and_reply(&ctx, &stream, msg).await,
        Some(other) => {
            let e = HandoffError::new(
                "unknown_op",
                format!("unknown op {other:?}: want \"export\" or \"claim\""),
            );
            reply_error(&stream, &e).await;
        }
        None => {
            let e = HandoffError::new(
                "bad_request",
                "the header has no string `op` (want \"export\" or \"claim\")",
            );
            reply_error(&stream, &e).await;
        }
    }
}

/// The request's `container`, for logs.
fn container_of(header: &Value) -> String {
    header
        .get("container")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

async fn claim_and_reply(ctx: &Ctx, stream: &UnixStream, msg: wire::Message) {
    let container = container_of(&msg.header);
    let restored = match claim::claim(ctx, msg).await {
        Ok(r) => r,
        Err(e) => {
            warn!(%container, code = e.code, error = %e.message, "claim refused");
            return reply_error(stream, &e).await;
        }
    };
    let fds: Vec<BorrowedFd<'_>> = restored.fds.iter().map(|f| f.as_fd()).collect();
    let sent = wire::send(stream, &restored.reply, &fds, &restored.taken.package.state).await;
    match sent {
        Ok(()) => {
            info!(%container, reply = %restored.reply, "claim done");
            // Our copies close now; the process holds the sockets.
            ctx.store.claimed(restored.taken);
        }
        Err(e) => {
            warn!(%container, error = %e, "handing the restored sockets over failed: they are \
                  silenced and closed, the package can be claimed again");
            claim::silence(&restored.fds);
            ctx.store.put_back(restored.taken);
        }
    }
}
