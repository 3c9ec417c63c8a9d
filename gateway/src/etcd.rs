//! etcd v3 as the registry's store: the few calls ferry makes ([`Kv`]: a range at a revision,
//! a transaction with compares; [`watch`]: a stream of changes under a prefix), spoken to
//! etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/watch`, keys and values in
//! base64) over ferry's own HTTP client. Hand-written on purpose: the etcd-client crate needs
//! protoc and tonic at build time, a cold-build cost CI cannot afford, for five calls.
//!
//! [`Kv`] is the seam: [`HttpKv`] talks to real members (it tries each until one answers, and
//! starts from the one that answered last); the unit tests' fake (`fake`) keeps revisions and
//! compares as etcd does.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `etcd:https://IP:PORT[,https://IP:PORT...]` (or every one `http://`): the members' client
/// URLs (IP addresses: the gateway resolves nothing; a member's certificate names its IP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members(pub Vec<SocketAddr>, pub Scheme);

/// How the members are spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// TLS, this gateway presenting its etcd client certificate (`[etcd_tls]`).
    Https,
}

impl std::str::FromStr for Members {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        let mut scheme = None;
        for url in s.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let (this, rest) = if let Some(r) = url.strip_prefix("https://") {
                (Scheme::Https, r)
            } else if let Some(r) = url.strip_prefix("http://") {
                (Scheme::Http, r)
            } else {
                return Err(format!(
                    "etcd member {url:?}: want https://IP:PORT (or http://IP:PORT)"
                ));
            };
            if scheme.is_some_and(|s| s != this) {
                return Err(format!(
                    "etcd member {url:?}: every member over https, or every one over http"
                ));
            }
            scheme = Some(this);
            let addr = rest.trim_end_matches('/');
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| format!("etcd member {url:?}: want https://IP:PORT: {e}"))?;
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        match scheme {
            Some(scheme) if !out.is_empty() => Ok(Members(out, scheme)),
            _ => Err("no etcd member given (want https://IP:PORT[,...])".into()),
        }
    }
}

impl std::fmt::Display for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.1 {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let urls: Vec<String> = self.0.iter().map(|a| format!("{scheme}://{a}")).collect();
        f.write_str(&urls.join(","))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No member took the request: it was not applied.
    #[error("etcd unreachable: no member took {what} ({tried})")]
    Unreachable { what: String, tried: String },
    /// The request reached a member but its answer was lost: it may or may not be applied.
    #[error(
        "etcd {member}: {what}: the answer was lost ({problem}): it may or may not have been applied"
    )]
    Unknown {
        member: SocketAddr,
        what: String,
        problem: String,
    },
    /// etcd refused the request (too large, compacted revision, ...): not applied.
    #[error("etcd {member}: {what}: refused: {message}")]
    Refused {
        member: SocketAddr,
        what: String,
        message: String,
        /// The asked revision was compacted away.
        compacted: bool,
    },
    #[error("etcd {member}: {what}: invalid answer: {problem}")]
    Decode {
        member: SocketAddr,
        what: String,
        problem: String,
    },
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A range's answer: the store's revision it was read at and the keys, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
    /// More keys than `limit` matched.
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key holds exactly this value.
    Value(Vec<u8>, Vec<u8>),
    /// The key does not exist.
    Absent(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    /// A put whose key goes when the lease does.
    PutLeased(Vec<u8>, Vec<u8>, i64),
    /// Keys in `[from, to)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// If every compare holds, every op, atomically (one revision).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
}

impl Txn {
    pub fn describe(&self) -> String {
        format!(
            "a transaction of {} compares, {} ops ({} bytes)",
            self.compare.len(),
            self.success.len(),
            self.bytes()
        )
    }
    pub fn bytes(&self) -> usize {
        self.success
            .iter()
            .map(|o| match o {
                Op::Put(k, v) | Op::PutLeased(k, v, _) => k.len() + v.len(),
                Op::DeleteRange(a, b) => a.len() + b.len(),
            })
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: i64,
}

/// The end of the range of keys that start with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What the registry's store needs of etcd (blocking calls: the gateway makes them on its
/// blocking change thread or on the follower's own thread).
pub trait Kv: Send + Sync + 'static {
    /// Keys in `[key, end)` (just `key` without `end`), at `revision` (0: the newest),
    /// at most `limit` (0: all).
    fn range(
        &self,
        key: &[u8],
        end: Option<&[u8]>,
        revision: i64,
        limit: i64,
    ) -> Result<Range, EtcdError>;
    fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError>;
    /// [`Self::txn`], each member given `timeout` to answer (a member that says nothing in
    /// that time: [`EtcdError::Unknown`]).
    fn txn_within(&self, txn: &Txn, timeout: Duration) -> Result<TxnResult, EtcdError> {
        let _ = timeout;
        self.txn(txn)
    }
    /// A lease of `ttl_secs`: its id.
    fn grant(&self, ttl_secs: i64) -> Result<i64, EtcdError>;
    /// Renews lease `id`: the seconds it has left (0: it expired, its keys are gone).
    fn keepalive(&self, id: i64) -> Result<i64, EtcdError>;
    /// Where it is (logs, errors).
    fn describe(&self) -> String;
}

/// How long a member may take to accept a connection before the next is tried: a member
/// whose host died answers nothing, and every change would otherwise wait out the whole
/// request's timeout on it first.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a member gets to answer a lease renewal.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(800);

/// The real members, through etcd's JSON gateway.
#[derive(Debug)]
pub struct HttpKv {
    members: Members,
    /// With https members: this gateway's etcd client identity.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The member that answered last (tried first).
    preferred: AtomicUsize,
    timeout: Duration,
}

/// Raw bytes in a member's answer (base64 in the JSON).
fn b64(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => B64.decode(s).map_err(|e| format!("base64: {e}")),
        other => Err(format!("want base64, found {other}")),
    }
}

/// An int64 in a member's answer (a string in etcd's JSON, absent when 0).
fn int(v: &Value) -> Result<i64, String> {
    match v {
        Value::Null => Ok(0),
        Value::String(s) => s.parse().map_err(|e| format!("int64 {s:?}: {e}")),
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("int64 {n}")),
        other => Err(format!("want int64, found {other}")),
    }
}

fn kv_of(v: &Value) -> Result<KeyValue, String> {
    Ok(KeyValue {
        key: b64(&v["key"])?,
        value: b64(&v["value"])?,
        mod_revision: int(&v["mod_revision"])?,
    })
}

/// An error answer of the JSON gateway: `{"error": ..., "message": ..., "code": N}`.
#[derive(Debug, Deserialize, Serialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    message: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    code: i64,
}

/// gRPC code of an answer that another member may serve (unavailable, deadline exceeded,
/// no leader, ...).
fn retry_elsewhere(code: i64, message: &str) -> bool {
    matches!(code, 4 | 14) || message.contains("no leader") || message.contains("not capable")
}

impl HttpKv {
    pub fn new(members: Members, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            members,
            tls,
            preferred: AtomicUsize::new(0),
            timeout: Duration::from_secs(3),
        }
    }

    pub fn members(&self) -> &Members {
        &self.members
    }

    /// POSTs `body` to `path` at each member in turn until one answers. `idempotent`: an
    /// answer lost after sending may be retried elsewhere (reads); else it is
    /// [`EtcdError::Unknown`].
    fn call(
        &self,
        path: &str,
        what: &str,
        body: Value,
        idempotent: bool,
    ) -> Result<Value, EtcdError> {
        self.call_within(path, what, body, idempotent, self.timeout)
    }

    /// [`Self::call`], each member given `timeout`.
    fn call_within(
        &self,
        path: &str,
        what: &str,
        body: Value,
        idempotent: bool,
        timeout: Duration,
    ) -> Result<Value, EtcdError> {
        use ferry_api::transport::{HttpError, Request};
        let body = bytes::Bytes::from(serde_json::to_vec(&body).expect("JSON values serialise"));
        let n = self.members.0.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut tried = Vec::new();
        for i in 0..n {
            let at = (first + i) % n;
            let member = self.members.0[at];
            let request = match &self.tls {
                Some(tls) => Request::post(path).tls(Some(tls.clone())),
                None => Request::post(path).plain(),
            };
            let request = request
                .json(body.clone())
                .timeout(timeout)
                .connect_timeout(CONNECT_TIMEOUT)
                .max_answer(256 << 20);
            // send_blocking starts a runtime of its own, which tokio refuses inside a running
            // one (the follower applies changes from its watch's future): there, on a thread
            // of its own.
            let answer = if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::scope(|s| {
                    s.spawn(|| request.send_blocking(member))
                        .join()
                        .unwrap_or_else(|_| {
                            Err(HttpError::Runtime {
                                addr: member,
                                source: std::io::Error::other("request thread panicked"),
                            })
                        })
                })
            } else {
                request.send_blocking(member)
            };
            let answer = match answer {
                Ok(a) => a,
                Err(
                    e @ (HttpError::Connect { .. }
                    | HttpError::Request { .. }
                    | HttpError::Runtime { .. }),
                ) => {
                    tried.push(format!("{member}: {e}"));
                    continue;
                }
                Err(e) if idempotent => {
                    tried.push(format!("{member}: {e}"));
                    continue;
                }
                Err(e) => {
                    return Err(EtcdError::Unknown {
                        member,
                        what: what.to_owned(),
                        problem: e.to_string(),
                    });
                }
            };
            if !answer.is_success() {
                let e: ErrorAnswer = serde_json::from_slice(&answer.body).unwrap_or_default();
                let message = if e.message.is_empty() {
                    format!(
                        "HTTP {} {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    )
                } else {
                    e.message
                };
                if retry_elsewhere(e.code, &message) {
                    tried.push(format!("{member}: {message}"));
                    continue;
                }
                return Err(EtcdError::Refused {
                    member,
                    what: what.to_owned(),
                    compacted: message.contains("compacted"),
                    message,
                });
            }
            self.preferred.store(at, Ordering::Relaxed);
            return serde_json::from_slice(&answer.body).map_err(|e| EtcdError::Decode {
                member,
                what: what.to_owned(),
                problem: e.to_string(),
            });
        }
        Err(EtcdError::Unreachable {
            what: what.to_owned(),
            tried: tried.join("; "),
        })
    }
}

impl Kv for HttpKv {
    fn range(
        &self,
        key: &[u8],
        end: Option<&[u8]>,
        revision: i64,
        limit: i64,
    ) -> Result<Range, EtcdError> {
        let mut body = json!({ "key": B64.encode(key) });
        if let Some(end) = end {
            body["range_end"] = json!(B64.encode(end));
        }
        if revision > 0 {
            body["revision"] = json!(revision.to_string());
        }
        if limit > 0 {
            body["limit"] = json!(limit.to_string());
        }
        let what = format!("range {}", String::from_utf8_lossy(key));
        let v = self.call("/v3/kv/range", &what, body, true)?;
        let decode = || -> Result<Range, String> {
            let kvs = match &v["kvs"] {
                Value::Null => Vec::new(),
                Value::Array(a) => a.iter().map(kv_of).collect::<Result<_, _>>()?,
                other => return Err(format!("kvs: {other}")),
            };
            Ok(Range {
                revision: int(&v["header"]["revision"])?,
                kvs,
                more: v["more"].as_bool().unwrap_or(false),
            })
        };
        decode().map_err(|problem| self.decode(&what, problem))
    }

    fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
        self.txn_within(txn, self.timeout)
    }

    fn txn_within(&self, txn: &Txn, timeout: Duration) -> Result<TxnResult, EtcdError> {
        let compare: Vec<Value> = txn
            .compare
            .iter()
            .map(|c| match c {
                Compare::Value(k, v) => json!({
                    "key": B64.encode(k), "result": "EQUAL", "target": "VALUE",
                    "value": B64.encode(v),
                }),
                Compare::Absent(k) => json!({
                    "key": B64.encode(k), "result": "EQUAL", "target": "CREATE",
                    "create_revision": "0",
                }),
            })
            .collect();
        let success: Vec<Value> = txn
            .success
            .iter()
            .map(|o| match o {
                Op::Put(k, v) => {
                    json!({"request_put": {"key": B64.encode(k), "value": B64.encode(v)}})
                }
                Op::PutLeased(k, v, lease) => json!({"request_put": {
                    "key": B64.encode(k), "value": B64.encode(v), "lease": lease.to_string(),
                }}),
                Op::DeleteRange(a, b) => json!({"request_delete_range": {
                    "key": B64.encode(a), "range_end": B64.encode(b),
                }}),
            })
            .collect();
        let what = txn.describe();
        let v = self.call_within(
            "/v3/kv/txn",
            &what,
            json!({ "compare": compare, "success": success }),
            false,
            timeout,
        )?;
        let revision =
            int(&v["header"]["revision"]).map_err(|problem| self.decode(&what, problem))?;
        Ok(TxnResult {
            succeeded: v["succeeded"].as_bool().unwrap_or(false),
            revision,
        })
    }

    fn grant(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let what = format!("lease grant {ttl_secs} s");
        let v = self.call(
            "/v3/lease/grant",
            &what,
            json!({"TTL": ttl_secs.to_string()}),
            false,
        )?;
        let id = int(&v["ID"]).map_err(|problem| self.decode(&what, problem))?;
        if id == 0 {
            return Err(self.decode(&what, format!("no lease id in {v}")));
        }
        Ok(id)
    }

    fn keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let what = format!("lease keepalive {id:x}");
        // Short: a renewal lost in an election is sent again soon, to the new leader, rather
        // than waited for (the gateway's view of its lease counts from the last one answered).
        let v = self.call_within(
            "/v3/lease/keepalive",
            &what,
            json!({"ID": id.to_string()}),
            true,
            KEEPALIVE_TIMEOUT,
        )?;
        int(&v["result"]["TTL"]).map_err(|problem| self.decode(&what, problem))
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.members)
    }
}

impl HttpKv {
    fn decode(&self, what: &str, problem: String) -> EtcdError {
        EtcdError::Decode {
            member: self.members.0[self.preferred.load(Ordering::Relaxed) % self.members.0.len()],
            what: what.to_owned(),
            problem,
        }
    }
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: Vec<u8>, mod_revision: i64 },
}

/// Why a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchEnd {
    /// The revision asked for was compacted away (read everything again).
    #[error("etcd compacted revision {0} away")]
    Compacted(i64),
    #[error("{0}")]
    Failed(String),
}

/// HTTP/1.1 over `io`, its connection driven on a task of its own.
async fn http1<T>(
    io: T,
) -> hyper::Result<(
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    Ok((sender, tokio::spawn(conn)))
}

/// Watches keys with `prefix` from `start_revision` at `member`, calling `on` with each
/// answer's events (in revision order) until `on` says stop (`false`) or the watch ends.
pub async fn watch(
    member: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
    prefix: &[u8],
    start_revision: i64,
    mut on: impl FnMut(Vec<Event>) -> bool,
) -> Result<(), WatchEnd> {
    use http_body_util::BodyExt as _;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        WatchEnd::Failed(format!("etcd {member}: watch: {what}: {e}"))
    };
    let stream = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(member),
    )
    .await
    .map_err(|e| failed("connect", &e))?
    .map_err(|e| failed("connect", &e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(member.ip().into());
            let stream = tokio::time::timeout(
                Duration::from_secs(3),
                tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream),
            )
            .await
            .map_err(|e| failed("TLS handshake", &e))?
            .map_err(|e| failed("TLS handshake", &e))?;
            http1(stream).await
        }
        None => http1(stream).await,
    }
    .map_err(|e| failed("handshake", &e))?;
    let body = json!({"create_request": {
        "key": B64.encode(prefix),
        "range_end": B64.encode(prefix_end(prefix)),
        "start_revision": start_revision.to_string(),
    }});
    let req = hyper::Request::post("/v3/watch")
        .header(hyper::header::HOST, member.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .map_err(|e| failed("request", &e))?;
    let answer = sender
        .send_request(req)
        .await
        .map_err(|e| failed("send", &e))?;
    if !answer.status().is_success() {
        conn.abort();
        return Err(failed("answer", &answer.status()));
    }
    let mut body = answer.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let result = loop {
        let frame = match body.frame().await {
            None => break Err(failed("stream", &"ended")),
            Some(Err(e)) => break Err(failed("stream", &e)),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        let mut stop = None;
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            match decode_watch(&line) {
                Ok(None) => {}
                Ok(Some(events)) => {
                    if !events.is_empty() && !on(events) {
                        stop = Some(Ok(()));
                        break;
                    }
                }
                Err(end) => {
                    stop = Some(Err(end));
                    break;
                }
            }
        }
        if let Some(s) = stop {
            break s;
        }
    };
    conn.abort();
    result
}

/// One line of the watch stream: its events (`None`: nothing, e.g. the created answer).
fn decode_watch(line: &[u8]) -> Result<Option<Vec<Event>>, WatchEnd> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| WatchEnd::Failed(format!("watch answer: {e}")))?;
    if !v["error"].is_null() {
        return Err(WatchEnd::Failed(format!("watch: {}", v["error"])));
    }
    let r = &v["result"];
    let bad = |p: String| WatchEnd::Failed(format!("watch answer: {p}"));
    let compact = int(&r["compact_revision"]).map_err(bad)?;
    if compact > 0 {
        return Err(WatchEnd::Compacted(compact));
    }
    if r["canceled"].as_bool() == Some(true) {
        return Err(WatchEnd::Failed(format!(
            "watch canceled: {}",
            r["cancel_reason"].as_str().unwrap_or("")
        )));
    }
    let Value::Array(events) = &r["events"] else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let kv = kv_of(&e["kv"]).map_err(bad)?;
        if e["type"].as_str() == Some("DELETE") {
            out.push(Event::Delete {
                key: kv.key,
                mod_revision: kv.mod_revision,
            });
        } else {
            out.push(Event::Put(kv));
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
pub(crate) mod fake {
    //! etcd's semantics in memory: one revision per write (a transaction is one), compares,
    //! ranges at past revisions, a switch to make it unreachable.
    use std::{
        collections::BTreeMap,
        sync::{
            Mutex,
            atomic::{AtomicBool, Ordering},
        },
    };

    use super::*;

    /// A key's values by revision (`None`: deleted then).
    type Versions = BTreeMap<i64, Option<Vec<u8>>>;

    #[derive(Debug, Default)]
    pub struct FakeKv {
        /// key → (revision → value; `None`: deleted then).
        history: Mutex<(i64, BTreeMap<Vec<u8>, Versions>)>,
        pub down: AtomicBool,
        /// Live leases and their keys.
        leases: Mutex<BTreeMap<i64, Vec<Vec<u8>>>>,
        /// Bytes a transaction may carry (etcd's --max-request-bytes).
        pub max_request: Mutex<Option<usize>>,
        /// The next transaction's answer is lost and it is not applied (a leader lost
        /// before it committed).
        pub lose_next_txn: AtomicBool,
        /// The next transaction's answer is lost and it is applied only just before the
        /// transaction after it (a proposal that was slow, not lost: a read in between does
        /// not see it).
        pub late_next_txn: AtomicBool,
        late: Mutex<Option<Txn>>,
    }

    impl FakeKv {
        fn at(map: &BTreeMap<i64, Option<Vec<u8>>>, rev: i64) -> Option<(i64, &Vec<u8>)> {
            let (r, v) = map.range(..=rev).next_back()?;
            v.as_ref().map(|v| (*r, v))
        }
        pub fn revision(&self) -> i64 {
            self.history.lock().unwrap().0
        }

        /// Lease `id` expires: its keys are deleted (one revision).
        pub fn expire(&self, id: i64) {
            let keys = self.leases.lock().unwrap().remove(&id).unwrap_or_default();
            let mut h = self.history.lock().unwrap();
            let next = h.0 + 1;
            for k in keys {
                if let Some(m) = h.1.get_mut(&k) {
                    m.insert(next, None);
                }
            }
            h.0 = next;
        }
    }

    impl Kv for FakeKv {
        fn range(
            &self,
            key: &[u8],
            end: Option<&[u8]>,
            revision: i64,
            limit: i64,
        ) -> Result<Range, EtcdError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(EtcdError::Unreachable {
                    what: "range".into(),
                    tried: "fake: down".into(),
                });
            }
            let h = self.history.lock().unwrap();
            let rev = if revision > 0 { revision } else { h.0 };
            let mut kvs = Vec::new();
            let mut more = false;
            let keys: Vec<&Vec<u8>> = match end {
                None => h.1.get_key_value(key).map(|(k, _)| k).into_iter().collect(),
                Some(end) => {
                    h.1.range(key.to_vec()..end.to_vec())
                        .map(|(k, _)| k)
                        .collect()
                }
            };
            for k in keys {
                if let Some((mod_revision, v)) = Self::at(&h.1[k], rev) {
                    if limit > 0 && kvs.len() as i64 == limit {
                        more = true;
                        break;
                    }
                    kvs.push(KeyValue {
                        key: k.clone(),
                        value: v.clone(),
                        mod_revision,
                    });
                }
            }
            Ok(Range {
                revision: h.0,
                kvs,
                more,
            })
        }

        fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(EtcdError::Unreachable {
                    what: txn.describe(),
                    tried: "fake: down".into(),
                });
            }
            if self.lose_next_txn.swap(false, Ordering::Relaxed) {
                return Err(EtcdError::Unknown {
                    member: ([127, 0, 0, 1], 2379).into(),
                    what: txn.describe(),
                    problem: "fake: answer lost".into(),
                });
            }
            let late = self.late.lock().unwrap().take();
            if let Some(late) = late {
                let _ = self.txn(&late);
            }
            if self.late_next_txn.swap(false, Ordering::Relaxed) {
                *self.late.lock().unwrap() = Some(txn.clone());
                return Err(EtcdError::Unknown {
                    member: ([127, 0, 0, 1], 2379).into(),
                    what: txn.describe(),
                    problem: "fake: answer lost, applied later".into(),
                });
            }
            if let Some(max) = *self.max_request.lock().unwrap()
                && txn.bytes() > max
            {
                return Err(EtcdError::Refused {
                    member: "127.0.0.1:2379".parse().unwrap(),
                    what: txn.describe(),
                    message: "etcdserver: request is too large".into(),
                    compacted: false,
                });
            }
            let mut h = self.history.lock().unwrap();
            let rev = h.0;
            let holds = txn.compare.iter().all(|c| match c {
                Compare::Value(k, want) => {
                    h.1.get(k)
                        .and_then(|m| Self::at(m, rev))
                        .is_some_and(|(_, v)| v == want)
                }
                Compare::Absent(k) => h.1.get(k).and_then(|m| Self::at(m, rev)).is_none(),
            });
            if !holds {
                return Ok(TxnResult {
                    succeeded: false,
                    revision: rev,
                });
            }
            let next = rev + 1;
            for op in &txn.success {
                match op {
                    Op::Put(k, v) => {
                        h.1.entry(k.clone())
                            .or_default()
                            .insert(next, Some(v.clone()));
                    }
                    Op::PutLeased(k, v, lease) => {
                        let mut leases = self.leases.lock().unwrap();
                        let Some(keys) = leases.get_mut(lease) else {
                            return Err(EtcdError::Refused {
                                member: "127.0.0.1:2379".parse().unwrap(),
                                what: txn.describe(),
                                message: "etcdserver: requested lease not found".into(),
                                compacted: false,
                            });
                        };
                        keys.push(k.clone());
                        h.1.entry(k.clone())
                            .or_default()
                            .insert(next, Some(v.clone()));
                    }
                    Op::DeleteRange(a, b) => {
                        let keys: Vec<Vec<u8>> =
                            h.1.range(a.clone()..b.clone())
                                .map(|(k, _)| k.clone())
                                .collect();
                        for k in keys {
                            let m = h.1.get_mut(&k).expect("listed");
                            if Self::at(m, rev).is_some() {
                                m.insert(next, None);
                            }
                        }
                    }
                }
            }
            h.0 = next;
            Ok(TxnResult {
                succeeded: true,
                revision: next,
            })
        }

        fn grant(&self, _ttl: i64) -> Result<i64, EtcdError> {
            let mut l = self.leases.lock().unwrap();
            let id = l.keys().next_back().map_or(1, |k| k + 1);
            l.insert(id, Vec::new());
            Ok(id)
        }

        fn keepalive(&self, id: i64) -> Result<i64, EtcdError> {
            Ok(if self.leases.lock().unwrap().contains_key(&id) {
                3
            } else {
                0
            })
        }

        fn describe(&self) -> String {
            "etcd:fake".into()
        }
    }

    #[test]
    fn the_fakes_leases_take_their_keys_with_them() {
        let kv = FakeKv::default();
        let id = kv.grant(3).unwrap();
        assert_eq!(kv.keepalive(id).unwrap(), 3);
        kv.txn(&Txn {
            compare: vec![],
            success: vec![Op::PutLeased(b"k".to_vec(), b"v".to_vec(), id)],
        })
        .unwrap();
        assert_eq!(kv.range(b"k", None, 0, 0).unwrap().kvs.len(), 1);
        kv.expire(id);
        assert!(kv.range(b"k", None, 0, 0).unwrap().kvs.is_empty());
        assert_eq!(kv.keepalive(id).unwrap(), 0);
        let refused = kv.txn(&Txn {
            compare: vec![],
            success: vec![Op::PutLeased(b"k".to_vec(), b"v".to_vec(), id)],
        });
        assert!(refused.is_err(), "a put on an expired lease is refused");
    }

    #[test]
    fn the_fake_keeps_etcds_revisions_and_compares() {
        let kv = FakeKv::default();
        let put = |k: &str, v: &str| Op::Put(k.as_bytes().to_vec(), v.as_bytes().to_vec());
        let r = kv
            .txn(&Txn {
                compare: vec![Compare::Absent(b"a".to_vec())],
                success: vec![put("a", "1"), put("b", "1")],
            })
            .unwrap();
        assert!(r.succeeded);
        assert_eq!(r.revision, 1);
        let lost = kv
            .txn(&Txn {
                compare: vec![Compare::Absent(b"a".to_vec())],
                success: vec![put("a", "2")],
            })
            .unwrap();
        assert!(!lost.succeeded);
        let r = kv
            .txn(&Txn {
                compare: vec![Compare::Value(b"a".to_vec(), b"1".to_vec())],
                success: vec![put("a", "2"), Op::DeleteRange(b"b".to_vec(), b"c".to_vec())],
            })
            .unwrap();
        assert!(r.succeeded);
        let now = kv.range(b"a", Some(b"z"), 0, 0).unwrap();
        assert_eq!(now.kvs.len(), 1);
        assert_eq!(now.kvs[0].value, b"2");
        let then = kv.range(b"a", Some(b"z"), 1, 0).unwrap();
        assert_eq!(then.kvs.len(), 2);
        assert_eq!(then.kvs[0].value, b"1");
        assert!(kv.range(b"a", Some(b"z"), 1, 1).unwrap().more);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_and_refuse_what_is_not_a_url_of_an_ip_and_port() {
        let m: Members = "http://127.0.0.1:2379, http://10.0.0.2:2379/"
            .parse()
            .unwrap();
        assert_eq!(m.0.len(), 2);
        assert_eq!(m.1, Scheme::Http);
        assert_eq!(m.to_string(), "http://127.0.0.1:2379,http://10.0.0.2:2379");
        let m: Members = "https://127.0.0.1:2379,https://10.0.0.2:2379"
            .parse()
            .unwrap();
        assert_eq!(m.1, Scheme::Https);
        assert_eq!(
            m.to_string(),
            "https://127.0.0.1:2379,https://10.0.0.2:2379"
        );
        for bad in [
            "",
            "https://127.0.0.1:2379,http://10.0.0.2:2379",
            "ftp://127.0.0.1:2379",
            "http://etcd:2379",
            "https://etcd:2379",
            "127.0.0.1:2379",
        ] {
            assert!(bad.parse::<Members>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/ferry/"), b"/ferry0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn watch_answers_decode_events_compaction_and_errors() {
        let created = br#"{"result":{"header":{"revision":"2"},"created":true}}"#;
        assert_eq!(decode_watch(created).unwrap(), None);
        let ev = br#"{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"YQ==","mod_revision":"3","value":"MQ=="}},{"type":"DELETE","kv":{"key":"Yg==","mod_revision":"3"}}]}}"#;
        let events = decode_watch(ev).unwrap().unwrap();
        assert_eq!(
            events,
            vec![
                Event::Put(KeyValue {
                    key: b"a".to_vec(),
                    value: b"1".to_vec(),
                    mod_revision: 3
                }),
                Event::Delete {
                    key: b"b".to_vec(),
                    mod_revision: 3
                }
            ]
        );
        let compacted = br#"{"result":{"header":{},"compact_revision":"7","canceled":true}}"#;
        assert!(matches!(
            decode_watch(compacted),
            Err(WatchEnd::Compacted(7))
        ));
        assert!(decode_watch(br#"{"error":{"message":"x"}}"#).is_err());
    }
}
