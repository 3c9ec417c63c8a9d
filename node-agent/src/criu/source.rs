//! The source side: `POST /v1/checkpoint/{migration}` (from the gateway, which runs the
//! migration). Dump with CRIU (the tree left stopped), stream the images to the destination,
//! which restores and releases; then kill the stopped tree — or, if the transfer or the
//! restore failed, resume it.

use std::{net::Ipv4Addr, os::unix::fs::MetadataExt as _, path::PathBuf, sync::Arc};

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use ferry_api::{
    Client, MigrationPhase,
    run::{
        CheckpointAnswer, CheckpointRequest, CriuStats, FailAt, Fence, FenceSide, LockMode,
        MemoryMode, PAGES_PHASE, PhaseTiming, RestoreAnswer, RunEvent, RuntimeKind,
    },
};
use tracing::{Instrument as _, info, info_span, warn};

use super::{Ctx, Refusal, authorize, cmd, images, lazy};
use crate::runtime::{
    Entry,
    driver::{Checkpoint, Stats},
};

fn bad(status: StatusCode, code: &'static str, m: String) -> Refusal {
    Refusal::new(status, code, m)
}

/// Checks the request against what this agent knows; returns the container's netns path.
async fn validate(ctx: &Ctx, id: &str, req: &CheckpointRequest) -> Result<PathBuf, Refusal> {
    let ip = req.container;
    let node = ctx.node.lock().await;
    let netns = node
        .applied
        .containers
        .get(&ip)
        .map(|(_, b)| b.netns.clone())
        .ok_or_else(|| {
            bad(
                StatusCode::NOT_FOUND,
                "not_local",
                format!("container {ip} is not built on host {}", ctx.host),
            )
        })?;
    let m = node
        .registry
        .as_ref()
        .and_then(|s| s.migrations.iter().find(|m| m.id == id))
        .ok_or_else(|| {
            bad(
                StatusCode::NOT_FOUND,
                "unknown_migration",
                format!(
                    "host {} knows no active migration {id} (not in its registry snapshot)",
                    ctx.host
                ),
            )
        })?;
    if m.container != ip || m.from != ctx.host || m.to != req.to {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "migration {id} moves {} from {} to {}, not {ip} from {} to {}",
                m.container, m.from, m.to, ctx.host, req.to
            ),
        ));
    }
    if let Some(snapshot) = node.registry.as_deref() {
        check_to_api(snapshot, &req.to, req.to_api)?;
    }
    if m.phase != MigrationPhase::Prepared {
        return Err(bad(
            StatusCode::CONFLICT,
            "bad_phase",
            format!(
                "migration {id} is {}: a checkpoint starts from prepared",
                m.phase
            ),
        ));
    }
    if node.applied.version < node.registry.as_ref().map_or(0, |s| s.version) {
        return Err(bad(
            StatusCode::CONFLICT,
            "not_applied",
            format!("host {} has not applied the registry yet: retry", ctx.host),
        ));
    }
    Ok(netns)
}

/// The images (the container's memory) go only to the destination host's own address: its
/// registered vtep, on a real port. A `to_api` pointing anywhere else is refused.
fn check_to_api(
    snapshot: &ferry_api::Snapshot,
    to: &str,
    to_api: std::net::SocketAddr,
) -> Result<(), Refusal> {
    let vtep = snapshot.hosts.iter().find(|h| h.name == to).map(|h| h.vtep);
    let refuse = |why: String| {
        Err(bad(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("to_api {to_api}: {why}"),
        ))
    };
    match vtep {
        None => refuse(format!(
            "host {to:?} is not in this host's registry snapshot"
        )),
        Some(v) if std::net::IpAddr::V4(v) != to_api.ip() => refuse(format!(
            "not host {to}'s address (its vtep is {v}): images go only to the destination"
        )),
        Some(_) if to_api.port() == 0 => refuse("port 0 is not a port: want 1–65535".into()),
        Some(_) => Ok(()),
    }
}

/// `POST /v1/checkpoint/{migration}`.
pub async fn checkpoint(
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<CheckpointAnswer>, Refusal> {
    authorize(&ctx.token, &headers)?;
    super::migration_param(&id)?;
    let req: CheckpointRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not a checkpoint request: {e}"),
        )
    })?;
    let netns = validate(&ctx, &id, &req).await?;
    let ip = req.container;
    // A container Podman runs (ferry-cni attached it) is adopted at its first move.
    let known = ctx.runtime.entry(ip).filter(|e| e.proc.running);
    // When the caller named no runtime, a Podman that cannot be asked (not installed, no
    // configuration on this host) only means "not a Podman container": the answer is
    // `no_process`, naming what Podman said. Asked for Podman by name, it is an error.
    let mut podman_said = None;
    let known = match known {
        Some(e) => Some(e),
        None if matches!(req.runtime, None | Some(RuntimeKind::Podman)) => {
            let rt = ctx.runtime.clone();
            let found = tokio::task::spawn_blocking(move || rt.adopt_podman(ip))
                .await
                .map_err(|e| {
                    bad(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("the Podman lookup failed: {e}"),
                    )
                })?;
            match found {
                Ok(found) => found,
                Err(e) if req.runtime.is_none() => {
                    tracing::debug!(container = %ip, error = %e, "no Podman container here");
                    podman_said = Some(e.to_string());
                    None
                }
                Err(e) => {
                    return Err(bad(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("container {ip}: {e}"),
                    ));
                }
            }
        }
        None => None,
    };
    let Some(entry) = known.filter(|e| e.proc.running && e.proc.fenced.is_none()) else {
        let podman = podman_said
            .map(|e| format!(" (nor could Podman be asked: {e})"))
            .unwrap_or_default();
        return Err(bad(
            StatusCode::CONFLICT,
            "no_process",
            format!(
                "container {ip} has no running process on {} to checkpoint{podman}",
                ctx.host
            ),
        ));
    };
    if let Some(want) = req.runtime
        && want != entry.proc.runtime
    {
        return Err(bad(
            StatusCode::CONFLICT,
            "wrong_runtime",
            format!(
                "container {ip} runs under the {} runtime on {}, not {want}",
                entry.proc.runtime, ctx.host
            ),
        ));
    }
    if req.memory == MemoryMode::Lazy && entry.proc.runtime != RuntimeKind::Agent {
        return Err(bad(
            StatusCode::CONFLICT,
            "lazy_unsupported",
            format!(
                "container {ip} runs under the {} runtime on {}: lazy memory (CRIU's lazy \
                 pages) needs the agent runtime; move it with --memory copy",
                entry.proc.runtime, ctx.host
            ),
        ));
    }
    let busy = ctx.claim(ip)?;
    // Before anything is frozen: no UNIX socket of the container may lead out of it.
    refuse_unix_peers_outside(ip, entry.proc.pid, &netns).await?;
    let span =
        info_span!("checkpoint", migration = %id, container = %ip, host = %ctx.host, to = %req.to);
    // In a task of its own: if the caller goes away mid-way (a gateway restart), the
    // checkpoint still ends in a consistent state (moved, or the source resumed) instead of
    // being dropped with the request, which could leave the source tree stopped.
    let task =
        tokio::spawn(async move { run(ctx, id, req, netns, entry, busy).await }.instrument(span));
    let answer = task.await.map_err(|e| {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the checkpoint task failed: {e}"),
        )
    })?;
    Ok(Json(answer))
}

/// Pushes a progress event to the gateway (best effort, never waits on the migration).
fn push(ctx: &Arc<Ctx>, id: &str, kind: &str, message: String, phase: Option<PhaseTiming>) {
    let event = RunEvent {
        unix_ms: ferry_api::unix_ms_f64(),
        kind: kind.into(),
        message,
        phase,
        bytes: None,
        criu: None,
    };
    let (client, id) = (ctx.gateway_client(), id.to_owned());
    tokio::spawn(async move {
        if let Err(e) = client.run_event(&id, &event).await {
            warn!(error = %e, "progress event not delivered to the gateway");
        }
    });
}

impl Ctx {
    pub fn gateway_client(&self) -> Client {
        Client::new(self.gateway, Some(self.token.clone())).with_fallbacks(&self.fallbacks)
    }
}

async fn run(
    ctx: Arc<Ctx>,
    id: String,
    req: CheckpointRequest,
    netns: PathBuf,
    entry: Entry,
    claim: crate::runtime::Claim,
) -> CheckpointAnswer {
    let ip = req.container;
    let answer = run_inner(ctx.clone(), id, req, netns, entry, claim).await;
    let mut node = ctx.node.lock().await;
    node.silence_on_freeze(ip, false);
    // A drain the freeze's switch did not end (no freeze came): its SYNs go to the container
    // here, which still owns the address.
    node.end_drain(ip);
    answer
}

/// The datagrams waiting in the stopped tree's UDP sockets (CRIU does not save them) go
/// with the images, for the destination to write back before the release
/// ([`super::udpq`]). Read without consuming them: a rolled-back tree still has them. What
/// cannot be read is reported (the run's events, the log), never dropped silently.
async fn carry_udp_queues(
    ctx: &Arc<Ctx>,
    id: &str,
    ip: Ipv4Addr,
    pid: i32,
    dir: &std::path::Path,
    widened: &[super::udpq::Widened],
) {
    let peeked = tokio::task::spawn_blocking(move || super::udpq::peek_tree(pid, ip))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
    let msg = match peeked {
        Err(e) => {
            warn!(error = %e, "reading the UDP receive queues");
            format!("udp: the receive queues could not be read ({e}): what they held is lost")
        }
        Ok(p) => {
            let (n, bytes) = (p.datagrams.len(), p.bytes());
            // Also with no datagram: the restored sockets get their sizes back from it.
            let write = if n > 0 || !widened.is_empty() {
                let carried = super::udpq::Carried {
                    sockets: widened.iter().map(|w| (w.local, w.rcvbuf)).collect(),
                    datagrams: p.datagrams,
                };
                std::fs::write(dir.join(super::udpq::FILE), super::udpq::encode(&carried)).err()
            } else {
                None
            };
            use super::udpq::{Event, count};
            count(Event::NotCarried, p.over_limit + p.not_ipv4);
            let mut msg = format!(
                "udp: {n} datagrams ({bytes} bytes) waiting in {} sockets carried over",
                p.sockets
            );
            match write {
                None => count(Event::Carried, n),
                Some(e) => {
                    count(Event::NotCarried, n);
                    msg = format!("udp: writing {n} waiting datagrams failed ({e}): they are lost");
                }
            }
            if p.over_limit > 0 {
                msg.push_str(&format!(
                    "; {} over the {} MiB limit lost",
                    p.over_limit,
                    super::udpq::MAX_BYTES >> 20
                ));
            }
            if p.not_ipv4 > 0 {
                msg.push_str(&format!("; {} IPv6 datagrams not carried", p.not_ipv4));
            }
            for e in &p.errors {
                msg.push_str(&format!("; unread: {e}"));
            }
            if p.errors.is_empty() && p.over_limit == 0 && p.not_ipv4 == 0 {
                info!(
                    datagrams = n,
                    bytes,
                    sockets = p.sockets,
                    "UDP queues carried over"
                );
            } else {
                warn!(datagrams = n, bytes, over_limit = p.over_limit, not_ipv4 = p.not_ipv4, errors = ?p.errors, "UDP queues partly carried over");
            }
            if n == 0 && p.errors.is_empty() && p.not_ipv4 == 0 {
                return;
            }
            msg
        }
    };
    push(ctx, id, "info", msg, None);
}

/// The checkpoint's refusal when a UNIX socket of the container has its peer outside it
/// (`crate::drain::check_unix_peers`).
async fn refuse_unix_peers_outside(
    ip: Ipv4Addr,
    pid: i32,
    netns: &std::path::Path,
) -> Result<(), Refusal> {
    let pids = tokio::task::spawn_blocking(move || super::resume::tree(pid))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| {
            bad(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("container {ip}: listing its processes: {e}"),
            )
        })?;
    crate::drain::check_unix_peers(ip, pids, netns)
        .await
        .map_err(|e| {
            let code = match e {
                crate::drain::UnixPeerError::Outside { .. } => "unix_peer_outside",
                crate::drain::UnixPeerError::Read { .. } => "internal",
            };
            let status = if code == "internal" {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::CONFLICT
            };
            bad(status, code, e.to_string())
        })
}

async fn run_inner(
    ctx: Arc<Ctx>,
    id: String,
    req: CheckpointRequest,
    netns: PathBuf,
    entry: Entry,
    claim: crate::runtime::Claim,
) -> CheckpointAnswer {
    let ip = req.container;
    let pid = entry.proc.pid;
    let runtime = entry.proc.runtime;
    let mut answer = CheckpointAnswer {
        ok: false,
        error: None,
        resumed: false,
        phases: Vec::new(),
        criu: None,
        image_bytes: 0,
        image_bytes_during_dump: 0,
        stopped_from_unix_ms: 0.0,
        stopped_until_unix_ms: 0.0,
    };
    let dir = ctx.criu.work_dir.join(format!("{id}-dump"));
    let _ = std::fs::remove_dir_all(&dir);
    // Images hold the container's memory: root only (the work directory too).
    if let Err(e) = ferry_api::private::create_dir(&ctx.criu.work_dir)
        .and_then(|()| ferry_api::private::create_dir(&dir))
    {
        answer.error = Some(format!("creating {}: {e}", dir.display()));
        answer.resumed = true;
        return answer;
    }
    let cleanup = |dir: &std::path::Path| {
        if !ctx.criu.keep_images {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    // The images' connection opens first, while the container still runs: its TCP and TLS
    // handshakes (two to three round trips across a WAN) are not in the frozen time, and a
    // destination that cannot be reached is found before anything is frozen. Dropped on any
    // early return below (the destination then restores nothing).
    let stream = match images::open(req.to_api, &ctx.token, &id).await {
        Ok(s) => s,
        Err(e) => {
            answer.error = Some(format!(
                "the destination's agent ({}, {}) cannot be reached: {e}; nothing was frozen",
                req.to, req.to_api
            ));
            answer.resumed = true;
            cleanup(&dir);
            return answer;
        }
    };
    let inode = match std::fs::metadata(&netns) {
        Ok(m) => m.ino(),
        Err(e) => {
            answer.error = Some(format!("{}: {e}", netns.display()));
            answer.resumed = true;
            cleanup(&dir);
            return answer;
        }
    };

    // Drain (`crate::drain`): new connections wait in the hold, the listeners' queues empty.
    match crate::drain::before_dump(&ctx.node, ip, &netns, ctx.criu.drain_timeout()).await {
        Ok(d) => {
            if let Some((_, d)) = d {
                let m = format!("drain: {:.1} ms, {} listener(s)", d.waited_ms, d.listeners);
                push(&ctx, &id, "info", m, None);
            }
        }
        Err(e) => {
            answer.error = Some(e.to_string());
            answer.resumed = true;
            cleanup(&dir);
            return answer;
        }
    }

    // Dump. In hold mode CRIU calls `ferry` (its action script) at network-lock, which asks
    // the gateway to freeze: from then on the destination holds every packet. The runtime
    // says how (criu dump, or runc checkpoint with CRIU's options in its config file).
    let dump = ctx.runtime.driver(runtime).and_then(|d| {
        d.checkpoint(&Checkpoint {
            entry: &entry,
            dir: &dir,
            netns_inode: inode,
            lock: req.lock,
            action_script: &ctx.criu.action_script,
            criu: &ctx.criu.binary,
        })
    });
    let dump = match dump {
        Ok(d) => d,
        Err(e) => {
            answer.error = Some(format!("checkpoint under {runtime}: {e}"));
            answer.resumed = true;
            cleanup(&dir);
            return answer;
        }
    };
    let mut dump = dump;
    // Lazy memory: the dump serves the pages from a page server on this host's vtep.
    let lazy = match req.memory {
        MemoryMode::Copy => None,
        MemoryMode::Lazy => match lazy_source(&ctx).await {
            Ok(l) => {
                dump.args
                    .extend(lazy::dump_args(l.page_server, ctx.tls.as_ref()));
                Some(l)
            }
            Err(e) => {
                answer.error = Some(format!("lazy memory: {e}"));
                answer.resumed = true;
                cleanup(&dir);
                return answer;
            }
        },
    };
    let mut env = ctx.script_env(&id, ip, "dump");
    env.extend(dump.env.iter().cloned());
    if req.fail == Some(FailAt::Dump) {
        env.push(("CRIU_FAULT".into(), cmd::FAULT_DUMP_PAGES.into()));
    }
    // The tasks are frozen before the freeze: from the FORWARD switch on, the old copy's
    // kernel-made empty segments are dropped (see `Applied::silenced`).
    if req.lock == LockMode::Hold {
        ctx.node.lock().await.silence_on_freeze(ip, true);
    }
    // Room in the UDP sockets for what arrives between CRIU's seize and the hold (see
    // `super::udpq`); given back as soon as CRIU is done with the tree, whatever happened.
    let (widened, widen_errors) =
        tokio::task::spawn_blocking(move || super::udpq::widen_tree(pid, ip))
            .await
            .unwrap_or_else(|e| (Vec::new(), vec![e.to_string()]));
    for e in &widen_errors {
        warn!(error = %e, "widening a UDP socket's receive buffer");
    }
    // The images stream from now on: each page file crosses the link while CRIU writes it,
    // the rest once the dump is done (`images::Opened::stream`). Dropped on any early return
    // below: the destination then gets an incomplete stream and restores nothing.
    let header = images::Header {
        migration: id.clone(),
        container: ip,
        from: ctx.host.clone(),
        lock: req.lock,
        argv: ctx.runtime.get(ip).map(|p| p.argv).unwrap_or_default(),
        fail_restore: req.fail == Some(FailAt::Restore),
        runtime,
        image: entry.proc.image.clone(),
        lazy,
    };
    let progress: images::Progress = {
        let (ctx, id) = (ctx.clone(), id.clone());
        Box::new(move |sent, total| {
            info!(sent, total, "sending images");
            let m = match total {
                Some(t) if sent >= t => return,
                Some(t) => format!("transfer: {sent} of {t} bytes"),
                None => format!("transfer: {sent} bytes while the dump runs"),
            };
            push(&ctx, &id, "progress", m, None);
        })
    };
    let stream = stream.stream(header, dir.clone(), progress);
    info!(pid, lock = req.lock.as_str(), %runtime, udp_widened = widened.len(), "dumping");
    let start = ferry_api::unix_ms_f64();
    // Lazy: the dump is done (all but the pages) when CRIU says it is ready; it goes on
    // serving the pages, the tasks seized, until the destination pulled the last one.
    let mut serving = None;
    let out = match &lazy {
        None => {
            cmd::run(
                &dump.program,
                &dump.args,
                &env,
                None,
                &dump.log,
                dump.capture,
            )
            .await
        }
        Some(_) => lazy::spawn_ready(&dump.program, &dump.args, &env, &dump.log)
            .await
            .map(|r| match r {
                Ok(s) => {
                    let ms = s.ready_ms;
                    serving = Some(s);
                    cmd::Outcome {
                        ok: true,
                        status: "serving pages".into(),
                        stdout: String::new(),
                        ms,
                        errors: Vec::new(),
                    }
                }
                Err(failed) => failed,
            }),
    };
    // A failed dump: CRIU resumed the tree, whose sockets get their sizes back at once. A
    // stopped tree keeps the widened ones until it runs again (a rollback: the datagrams
    // held meanwhile come back unpaced) or is killed.
    let dump_ok = out.as_ref().is_ok_and(|o| o.ok);
    if !widened.is_empty() && !dump_ok {
        let w = widened.clone();
        let _ = tokio::task::spawn_blocking(move || super::udpq::give_back(pid, ip, &w)).await;
    }
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            answer.error = Some(format!("starting {}: {e}", dump.program.display()));
            answer.resumed = true;
            cleanup(&dir);
            return answer;
        }
    };
    // The tree as the fencing expects it: stopped after a dump, running after a failed one
    // (the runtime checks; under runc CRIU's options came through a file runc hands it).
    let checked = {
        let (rt, e, ok) = (ctx.runtime.clone(), entry.clone(), out.ok);
        tokio::task::spawn_blocking(move || {
            rt.driver(e.proc.runtime)
                .map_err(|e| e.to_string())?
                .checkpointed(&e, ok)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    if !out.ok {
        // CRIU resumed the tree itself (and, in hold mode, ran network-unlock: abort).
        let mut e = out.failure(dump.name);
        if let Err(c) = checked {
            e = format!("{e}; {c}");
        }
        warn!(error = %e, "dump failed; the container runs on here");
        answer.error = Some(e);
        answer.resumed = true;
        cleanup(&dir);
        return answer;
    }
    if let Err(e) = checked {
        // A tree that runs on would be a second copy: the dump's images must not be used.
        let e = format!("{runtime} checkpoint: {e}; the source asked the gateway to abort");
        warn!(error = %e, "checkpoint did not stop the tree");
        if !widened.is_empty() {
            let w = widened.clone();
            let _ = tokio::task::spawn_blocking(move || super::udpq::give_back(pid, ip, &w)).await;
        }
        let (c, mid) = (ctx.clone(), id.clone());
        tokio::spawn(
            async move {
                let decided = ask_abort(&c, &mid).await;
                info!(decided, "abort asked for");
            }
            .in_current_span(),
        );
        answer.error = Some(e);
        answer.resumed = true;
        cleanup(&dir);
        return answer;
    }
    let log = std::fs::read_to_string(&dump.log).unwrap_or_default();
    let mut stats = CriuStats::default();
    read_stats(&dump.stats, &out.stdout, &mut stats);
    answer.stopped_from_unix_ms = start + cmd::log_offset_ms(&log, cmd::LOG_SEIZED).unwrap_or(0.0);
    let dump_phase = PhaseTiming {
        name: "dump".into(),
        start_unix_ms: start,
        ms: out.ms,
        bytes: None,
    };
    info!(
        ms = out.ms,
        frozen_ms = stats.frozen_ms,
        pages = stats.pages_written,
        "dumped"
    );
    push(
        &ctx,
        &id,
        "phase",
        format!(
            "dump: {:.1} ms (CRIU frozen {:.1} ms, {} pages)",
            out.ms, stats.frozen_ms, stats.pages_written
        ),
        Some(dump_phase.clone()),
    );
    answer.phases.push(dump_phase);
    answer.criu = Some(stats.clone());
    ctx.node.lock().await.mark_dumped(ip, true);
    carry_udp_queues(&ctx, &id, ip, pid, &dir, &widened).await;
    ctx.runtime.remember_udp_widened(ip, widened.clone());
    // From here the stopped tree is a fenced copy: it runs again only if the registry aborts
    // the migration, and is killed once the destination runs it (see `crate::fencing`).
    if serving.is_some() {
        ctx.runtime.serving_pages(ip, true);
    }
    ctx.runtime.fence(
        ip,
        Fence {
            migration: id.clone(),
            side: FenceSide::Source,
        },
    );
    // CRIU is done with the tree; the fencing owns it now. The stream below may outlive a
    // cut link by minutes (TCP's back-off): it must not keep the container claimed, or the
    // migration back here would be refused meanwhile.
    drop(claim);

    // The rest of the images; the destination restores and releases before it answers.
    ferry_api::faultpoint::pause("transfer", &id).await;
    let transfer_start = ferry_api::unix_ms_f64();
    let sent = stream.finish().await;
    if serving.is_none() {
        // (Lazy: CRIU still writes its log and stats there; removed once it ended.)
        cleanup(&dir);
    }
    if let Ok(s) = &sent {
        // Even if the restore fails, the images did travel: report them.
        answer.image_bytes = s.bytes;
        answer.image_bytes_during_dump = s.during_dump;
        info!(
            bytes = s.bytes,
            during_dump = s.during_dump,
            after_dump_ms = s.send_ms,
            "images sent"
        );
        if s.during_dump > 0 {
            push(
                &ctx,
                &id,
                "info",
                format!(
                    "transfer: {} of {} bytes crossed while the dump ran",
                    s.during_dump, s.bytes
                ),
                None,
            );
        }
        answer.phases.push(PhaseTiming {
            name: "transfer".into(),
            start_unix_ms: transfer_start,
            ms: s.send_ms,
            bytes: Some(s.bytes),
        });
    }
    let restored = match sent {
        Err(source) => Err(TransferError::Send {
            to: req.to.clone(),
            source,
        }),
        Ok(s) if (200..300).contains(&s.status) => {
            match serde_json::from_slice::<RestoreAnswer>(&s.body) {
                Ok(a) => Ok((s, a)),
                Err(e) => Err(TransferError::Answer(e)),
            }
        }
        Ok(s) => Err(TransferError::Refused {
            to: req.to.clone(),
            source: ferry_api::client::http_error(s.status, &s.body),
        }),
    };
    let (sent, restored) = match restored {
        Ok(r) => r,
        Err(e) => {
            // The destination did not take the container. Whether it runs there is the
            // registry's decision, not ours: ask for the abort (the gateway refuses it if the
            // destination was released meanwhile), and let the fencing resume the tree when
            // the abort reaches this host.
            // In a task of its own: this checkpoint ends now (its claim on the container
            // goes), so the fencing can resume the tree the moment the abort arrives, without
            // waiting for the gateway to hear back from every agent.
            if let Some(s) = serving.take() {
                // The destination will not pull the pages: the tree stays stopped (SIGSTOP
                // pending while CRIU still traces it) and the page server goes; the abort
                // resumes the tree like any dumped one.
                // (A harness may hold the source here while CRIU's page server ends by
                // itself: the tree must stay stopped all the same.)
                ferry_api::faultpoint::pause("lazy-refused", &id).await;
                let stopped = lazy::stop_tree(pid);
                s.kill().await;
                ctx.runtime.serving_pages(ip, false);
                cleanup(&dir);
                info!(
                    ?stopped,
                    "page server ended: the tree stays stopped for the decision"
                );
            }
            warn!(error = %e, "transfer or restore failed: asking the gateway to abort");
            let (c, mid) = (ctx.clone(), id.clone());
            tokio::spawn(
                async move {
                    let decided = ask_abort(&c, &mid).await;
                    info!(decided, "abort asked for");
                }
                .in_current_span(),
            );
            answer.error = Some(format!("{e}; the source asked the gateway to abort"));
            return answer;
        }
    };
    answer.phases.retain(|p| p.name != "transfer");
    let mut transfer = restored.transfer.clone();
    // What was left to send once the dump was done: from then (the sender's clock) to the
    // destination's last byte (its clock; the same one in the lab, NTP's apart elsewhere).
    // The destination's own phase starts when the request arrived, before the drain.
    let received = transfer.start_unix_ms + transfer.ms;
    transfer.start_unix_ms = transfer_start;
    transfer.ms = (received - transfer_start).max(sent.send_ms);
    transfer.bytes = Some(sent.bytes);
    answer.phases.push(transfer);
    answer.phases.push(restored.restore.clone());
    if let Some(r) = &restored.release {
        answer.phases.push(r.clone());
    }
    if let Some(s) = answer.criu.as_mut() {
        s.restore_ms = restored.criu_restore_ms;
        s.pages_restored = restored.pages_restored;
    }
    answer.stopped_until_unix_ms = restored.resumed_unix_ms;

    // The stopped copy stays fenced until the destination runs the container; the fencing
    // kills it then (its sockets are in repair mode, so closing them sends nothing).
    match restored.release_error {
        Some(e) => {
            answer.error = Some(format!("restored at {} but not released: {e}", req.to));
        }
        None => answer.ok = true,
    }
    if let Some(s) = serving.take() {
        let restored_at = restored.restore.start_unix_ms + restored.restore.ms;
        push(
            &ctx,
            &id,
            "info",
            "pages: the destination pulls the memory; the source serves it".into(),
            None,
        );
        match s.finish().await {
            Ok(end) => {
                let last = ferry_api::unix_ms_f64();
                // What the page server had to serve: the lazy pages CRIU's log counted.
                let log = std::fs::read_to_string(&dump.log).unwrap_or_default();
                let served = lazy::lazy_pages_in_log(&log);
                let pages = PhaseTiming {
                    name: PAGES_PHASE.into(),
                    start_unix_ms: restored_at,
                    ms: (last - restored_at).max(0.0),
                    bytes: Some(served * lazy::PAGE_SIZE),
                };
                info!(
                    ok = end.ok,
                    pages = served,
                    after_ready_ms = end.after_ready_ms,
                    "page server ended"
                );
                if end.ok {
                    answer.phases.push(pages);
                } else {
                    // CRIU resumed the tree (its failure path): stop it again at once; the
                    // fencing decides (the destination owns the container now).
                    let stopped = lazy::stop_tree(pid);
                    let e = format!(
                        "the page server failed ({}) before the destination had every page: {}",
                        end.status,
                        cmd::log_errors(&log, 3).join(" | ")
                    );
                    warn!(error = %e, ?stopped, "lazy pages incomplete");
                    answer.ok = false;
                    answer.error = Some(e);
                }
            }
            Err(e) => {
                answer.ok = false;
                answer.error = Some(format!("waiting for the page server: {e}"));
            }
        }
        cleanup(&dir);
        ctx.runtime.serving_pages(ip, false);
    }
    info!(
        bytes = sent.bytes,
        restored_pid = restored.pid,
        "container moved"
    );
    answer
}

/// Where this host serves a lazy dump's pages: its registered vtep (the underlay, where the
/// destination's agent reaches it), a free port. Raises `fs.pipe-max-size` for CRIU's page
/// server when it is too low (host-wide; logged).
async fn lazy_source(ctx: &Ctx) -> Result<lazy::LazySource, String> {
    let vtep = {
        let node = ctx.node.lock().await;
        node.registry
            .as_ref()
            .and_then(|s| s.hosts.iter().find(|h| h.name == ctx.host).map(|h| h.vtep))
    }
    .ok_or_else(|| format!("host {} is not in its own registry snapshot", ctx.host))?;
    tokio::task::spawn_blocking(move || {
        if let Some(was) = lazy::ensure_pipe_max_size()
            .map_err(|e| format!("raising fs.pipe-max-size for CRIU's page server: {e}"))?
        {
            warn!(
                was,
                now = lazy::PIPE_MAX_SIZE,
                "fs.pipe-max-size raised (host-wide) for CRIU's page server"
            );
        }
        let port = lazy::pick_port(vtep).map_err(|e| format!("a port on {vtep}: {e}"))?;
        Ok(lazy::LazySource {
            page_server: std::net::SocketAddr::new(vtep.into(), port),
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// CRIU's figures, from where the runtime says they are (its stdout, or a stats image).
pub fn read_stats(from: &Stats, stdout: &str, stats: &mut CriuStats) {
    match from {
        Stats::Stdout => cmd::parse_stats(stdout, stats),
        Stats::PodmanJson => {
            if crate::runtime::podman::parse_print_stats(stdout, stats).is_none() {
                warn!("Podman printed no statistics");
            }
        }
        Stats::Image(path) => {
            let ok = std::fs::read(path)
                .map(|b| crate::runtime::runc::parse_stats_image(&b, stats))
                .unwrap_or(false);
            if !ok {
                warn!(path = %path.display(), "CRIU's statistics image is missing or unreadable");
            }
        }
    }
}

/// Longest pause between two abort requests.
const ABORT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the gateway to abort `id` until it answers with a decision, or the decision reaches
/// this host through the registry. Returns what was decided, in words.
async fn ask_abort(ctx: &Ctx, id: &str) -> String {
    let client = ctx.gateway_client();
    let mut backoff = std::time::Duration::from_millis(20);
    loop {
        match client.abort_migration(id, None).await {
            Ok(_) => return "the gateway aborted the migration".into(),
            Err(ferry_api::ApiError::Http {
                status, message, ..
            }) if (400..500).contains(&status) => {
                return format!("the gateway refused the abort: {message}");
            }
            Err(e) => match ctx.phase_here(id).await {
                Some(MigrationPhase::Prepared | MigrationPhase::Frozen) => {
                    warn!(error = %e, "abort not answered yet: retrying");
                }
                Some(p) => {
                    return format!("the migration is {p} (the abort was not answered: {e})");
                }
                None => {
                    return format!("the migration is over here (the abort was not answered: {e})");
                }
            },
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(ABORT_BACKOFF_MAX);
    }
}

/// Why the container did not come up at the destination (the source asks for the abort).
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("transfer to {to} failed: {source}")]
    Send {
        to: String,
        source: images::SendError,
    },
    #[error("the destination's answer is not understood: {0}")]
    Answer(#[source] serde_json::Error),
    #[error("the destination {to} refused: {source}")]
    Refused {
        to: String,
        source: ferry_api::ApiError,
    },
}

impl Ctx {
    /// The environment CRIU passes to its action script (`ferry`).
    pub fn script_env(&self, id: &str, ip: Ipv4Addr, side: &str) -> Vec<(String, String)> {
        let path = |p: &std::path::Path| p.display().to_string();
        let tls = match &self.tls {
            Some(f) => vec![
                ("FERRY_TLS_CA".into(), path(&f.ca)),
                ("FERRY_TLS_CERT".into(), path(&f.cert)),
                ("FERRY_TLS_KEY".into(), path(&f.key)),
            ],
            None => vec![("FERRY_INSECURE_PLAINTEXT".into(), "true".into())],
        };
        tls.into_iter()
            .chain([
                ("FERRY_GATEWAY".into(), {
                    let all: Vec<String> = std::iter::once(self.gateway)
                        .chain(self.fallbacks.iter().copied())
                        .map(|a| a.to_string())
                        .collect();
                    all.join(",")
                }),
                (
                    "FERRY_TOKEN_FILE".into(),
                    self.token_file.display().to_string(),
                ),
                ("FERRY_MIGRATION".into(), id.to_owned()),
                ("FERRY_CONTAINER".into(), ip.to_string()),
                ("FERRY_CRIU_SIDE".into(), side.to_owned()),
                ("FERRY_HOST".into(), self.host.clone()),
            ])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_go_only_to_the_destination_hosts_address() {
        let snapshot = ferry_api::Snapshot {
            version: 3,
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            overlay6_cidr: None,
            vni: 4242,
            hosts: vec![ferry_api::HostInfo {
                name: "b1".into(),
                vtep: "198.18.2.10".parse().unwrap(),
                overlay_ip: "10.244.255.3".parse().unwrap(),
                role: ferry_api::HostRole::Host,
                active_since: None,
            }],
            endpoints: vec![],
            public: vec![],
            migrations: vec![],
        };
        check_to_api(&snapshot, "b1", "198.18.2.10:7401".parse().unwrap()).unwrap();
        for (to, to_api, want) in [
            (
                "b1",
                "203.0.113.66:7401",
                "not host b1's address (its vtep is 198.18.2.10)",
            ),
            ("b1", "127.0.0.1:7401", "not host b1's address"),
            ("b1", "198.18.2.10:0", "port 0 is not a port"),
            (
                "zz",
                "198.18.2.10:7401",
                "host \"zz\" is not in this host's registry",
            ),
        ] {
            let e = check_to_api(&snapshot, to, to_api.parse().unwrap()).unwrap_err();
            assert_eq!(
                (e.0, e.1),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{to_api}"
            );
            assert!(
                e.2.contains(&format!("to_api {to_api}: {want}")),
                "{to_api}: {}",
                e.2
            );
        }
    }
}
