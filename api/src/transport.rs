//! One HTTP/1.1 request per connection, over hyper: what [`crate::Client`] (the gateway's API)
//! and the agents' peer APIs (checkpoint, images, hand-off, containers) are spoken with.
//!
//! Each request opens its own TCP connection (`Connection: close`, as before: the lab makes
//! requests from inside network namespaces and the gateway counts watches, so no pool), has one
//! deadline over connect, request and the whole answer, and bounds the answer's body. The one
//! exception is a watch's long polls, which follow each other on one connection owned by the
//! watch ([`KeptConnection`], `crate::Watcher`): no pool either, and a connection whose
//! request failed is dropped. The
//! connection is handed to hyper's `client::conn::http1` as a plain byte stream, so a TLS stream
//! (tokio-rustls) takes the TCP stream's place when the request has a TLS configuration
//! ([`Request::tls`]): the server's certificate must come from the cluster's CA and name the
//! address connected to, and the client presents its own (see `ferry-tls`). [`block_on`] is
//! the one blocking entry for synchronous callers (the lab, tests).

use std::{future::Future, io, net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full, Limited, channel::Channel, combinators::BoxBody};
use hyper::{
    HeaderMap,
    header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::client::{ApiError, DEFAULT_TIMEOUT, MAX_BODY, http_error};

/// The TLS identity of a process that has exactly one (an agent): requests without their own
/// [`Request::tls`] use it. Set once at start; later calls are ignored.
static PROCESS_TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

/// Makes `tls` the identity of every request of this process that names none (see
/// [`Request::tls`]). For daemons with one identity, so that no call site can forget it.
pub fn set_process_tls(tls: Arc<rustls::ClientConfig>) {
    let _ = PROCESS_TLS.set(tls);
}

/// Why a request got no (acceptable) answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{addr}: {what}: cannot build the request: {source}")]
    Request {
        addr: SocketAddr,
        what: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed, or the server ended it with an alert (it refused this
    /// client's certificate).
    #[error("{addr}: TLS: {reason}{hint}")]
    Tls {
        addr: SocketAddr,
        reason: String,
        hint: &'static str,
    },
    #[error("{addr}: {what}: no complete answer within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        what: String,
        timeout: Duration,
    },
    #[error("{addr}: {what}: {source}")]
    Io {
        addr: SocketAddr,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{addr}: {what}: invalid HTTP answer: {source}")]
    Protocol {
        addr: SocketAddr,
        what: String,
        #[source]
        source: ProtocolError,
    },
    #[error("{addr}: starting a runtime for a blocking request: {source}")]
    Runtime {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What was wrong with an answer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Http(hyper::Error),
    #[error("answer body larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("the connection ended before the answer was complete ({reason})")]
    Truncated { reason: String },
}

/// An open connection (TCP, or TLS over it) for one request: [`Request::connect`].
pub struct Connection {
    addr: SocketAddr,
    stream: Box<dyn Stream>,
    /// The first TLS error the stream met (TLS only).
    alert: Option<Arc<std::sync::Mutex<Option<rustls::Error>>>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("tls", &self.alert.is_some())
            .finish()
    }
}

/// A byte stream hyper can speak HTTP/1.1 over.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// A request to send to one address.
#[derive(Debug)]
pub struct Request {
    method: String,
    path: String,
    token: Option<String>,
    headers: Vec<(String, String)>,
    body: Body,
    timeout: Option<Duration>,
    /// Deadline of the TCP connect alone (a peer that died answers nothing, not even a
    /// refusal): past it, [`HttpError::Connect`], so a caller with several peers moves on.
    connect_timeout: Option<Duration>,
    max_answer: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Plain TCP even in a process with a TLS identity (tests of the refusal).
    plain: bool,
}

#[derive(Debug)]
enum Body {
    None,
    Full(Bytes),
    /// Written through a [`BodyWriter`] while the request is under way; exact length.
    Stream(Channel<Bytes, io::Error>, u64),
    /// The same, length unknown: chunked transfer encoding.
    Chunked(Channel<Bytes, io::Error>),
}

impl Request {
    /// A copy to send again elsewhere; `None` for a streamed body (written once).
    pub fn try_clone(&self) -> Option<Self> {
        let body = match &self.body {
            Body::None => Body::None,
            Body::Full(b) => Body::Full(b.clone()),
            Body::Stream(..) | Body::Chunked(..) => return None,
        };
        Some(Self {
            method: self.method.clone(),
            path: self.path.clone(),
            token: self.token.clone(),
            headers: self.headers.clone(),
            body,
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            max_answer: self.max_answer,
            tls: self.tls.clone(),
            plain: self.plain,
        })
    }

    /// `method path` (the path with its query, already percent-encoded). Deadline
    /// [`DEFAULT_TIMEOUT`], answers up to [`MAX_BODY`] bytes.
    pub fn new(method: &str, path: impl Into<String>) -> Self {
        Self {
            method: method.to_owned(),
            path: path.into(),
            token: None,
            headers: Vec::new(),
            body: Body::None,
            timeout: Some(DEFAULT_TIMEOUT),
            connect_timeout: None,
            max_answer: MAX_BODY,
            tls: None,
            plain: false,
        }
    }

    /// Plain HTTP, whatever this process's identity ([`set_process_tls`]): only to check that
    /// a server refuses it.
    pub fn plain(mut self) -> Self {
        self.plain = true;
        self
    }

    /// Over TLS with this client configuration (`ferry_tls::Tls::client_config`); `None`:
    /// plain TCP.
    pub fn tls(mut self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        self.tls = tls;
        self
    }

    pub fn get(path: impl Into<String>) -> Self {
        Self::new("GET", path)
    }

    pub fn post(path: impl Into<String>) -> Self {
        Self::new("POST", path)
    }

    /// Sends `Authorization: Bearer <token>`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// One more header, sent as given.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A body, sent with its Content-Length (no Content-Type: see [`Request::json`]).
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Body::Full(body.into());
        self
    }

    /// A JSON body (already encoded), with `Content-Type: application/json`.
    pub fn json(self, body: impl Into<Bytes>) -> Self {
        self.header(CONTENT_TYPE.as_str(), "application/json")
            .body(body)
    }

    /// A body of exactly `len` bytes written through the returned [`BodyWriter`] while
    /// [`Request::send`] runs (drive both at once, e.g. with `tokio::join!`).
    pub fn stream(mut self, len: u64) -> (Self, BodyWriter) {
        // Two frames in flight: the writer reads the next chunk while hyper sends one.
        let (tx, body) = Channel::new(2);
        self.body = Body::Stream(body, len);
        (self, BodyWriter { tx })
    }

    /// A body of a length not known yet (sent chunked), written through the returned
    /// [`BodyWriter`] whenever it is ready: the connection, its TLS handshake and the request's
    /// head go out as soon as [`Request::send`] runs (e.g. spawned ahead of a long job). The
    /// peer takes the body as complete only if the writer is dropped, not aborted.
    pub fn stream_chunked(mut self) -> (Self, BodyWriter) {
        let (tx, body) = Channel::new(2);
        self.body = Body::Chunked(body);
        (self, BodyWriter { tx })
    }

    /// The deadline of the whole exchange (connect, request, complete answer).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The deadline of the TCP connect alone (see the field).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// No deadline (an answer that comes when the peer has finished a long job).
    pub fn without_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Largest answer body accepted.
    pub fn max_answer(mut self, limit: usize) -> Self {
        self.max_answer = limit;
        self
    }

    /// `METHOD path`, how errors name the request.
    pub fn what(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    /// Sends the request to `addr` on a new connection and reads the whole answer, whatever
    /// its status.
    pub async fn send(self, addr: SocketAddr) -> Result<Response, HttpError> {
        let (what, timeout) = (self.what(), self.timeout);
        within(timeout, addr, &what, self.exchange(addr, &what)).await
    }

    /// [`Request::send`] from synchronous code (see [`block_on`]).
    pub fn send_blocking(self, addr: SocketAddr) -> Result<Response, HttpError> {
        block_on(self.send(addr)).map_err(|source| HttpError::Runtime { addr, source })?
    }

    fn build(
        self,
        addr: SocketAddr,
        keep_alive: bool,
    ) -> Result<hyper::Request<ReqBody>, hyper::http::Error> {
        let mut b = hyper::Request::builder()
            .method(self.method.as_str())
            .uri(self.path.as_str())
            .header(HOST, addr.to_string())
            .header(USER_AGENT, concat!("ferry/", env!("CARGO_PKG_VERSION")));
        if !keep_alive {
            b = b.header(CONNECTION, "close");
        }
        if let Some(t) = &self.token {
            b = b.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        for (name, value) in &self.headers {
            b = b.header(name.as_str(), value.as_str());
        }
        let body = match self.body {
            Body::None => {
                if matches!(self.method.as_str(), "POST" | "PUT" | "PATCH") {
                    b = b.header(CONTENT_LENGTH, "0");
                }
                Empty::new().map_err(|never| match never {}).boxed()
            }
            Body::Full(bytes) => Full::new(bytes).map_err(|never| match never {}).boxed(),
            Body::Stream(channel, len) => {
                b = b.header(CONTENT_LENGTH, len);
                channel.boxed()
            }
            // No length and no size hint: hyper sends it chunked.
            Body::Chunked(channel) => channel.boxed(),
        };
        b.body(body)
    }

    async fn exchange(self, addr: SocketAddr, what: &str) -> Result<Response, HttpError> {
        let conn = self.connect(addr).await?;
        self.exchange_over(conn, what).await
    }

    /// Opens this request's connection to `addr` (TCP, then TLS if the request or the process
    /// has a TLS identity) without sending anything: [`Request::send_over`] sends on it. For a
    /// caller that wants to know the peer is reachable, and to have the handshakes behind it,
    /// before it starts the work whose result the request carries.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Connection, HttpError> {
        let tls = match self.plain {
            true => None,
            false => self.tls.clone().or_else(|| PROCESS_TLS.get().cloned()),
        };
        let stream = match self.connect_timeout {
            None => TcpStream::connect(addr).await,
            Some(t) => tokio::time::timeout(t, TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer to the connection within {t:?}"),
                    ))
                }),
        }
        .map_err(|source| HttpError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        match tls {
            None => Ok(Connection {
                addr,
                stream: Box::new(stream),
                alert: None,
            }),
            Some(config) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(|e| {
                        tls_error(addr, &e).unwrap_or(HttpError::Connect { addr, source: e })
                    })?;
                // In TLS 1.3 the server judges the client's certificate after the client's
                // handshake is over, so its alert may surface in hyper as any failure (a
                // canceled request, a reset): the alert recorded on the stream says why.
                let alert = Arc::new(std::sync::Mutex::new(None));
                Ok(Connection {
                    addr,
                    stream: Box::new(Recorded {
                        inner: stream,
                        error: alert.clone(),
                    }),
                    alert: Some(alert),
                })
            }
        }
    }

    /// Sends the request on `conn` (from [`Request::connect`]) and reads the whole answer,
    /// within the request's deadline (counted from now).
    pub async fn send_over(self, conn: Connection) -> Result<Response, HttpError> {
        let (what, addr, timeout) = (self.what(), conn.addr, self.timeout);
        within(timeout, addr, &what, self.exchange_over(conn, &what)).await
    }

    async fn exchange_over(self, conn: Connection, what: &str) -> Result<Response, HttpError> {
        let Connection {
            addr,
            stream,
            alert,
        } = conn;
        let r = self.exchange_on(stream, addr, what).await;
        blame_alert(r, alert.as_ref(), addr)
    }

    async fn exchange_on<S>(
        self,
        stream: S,
        addr: SocketAddr,
        what: &str,
    ) -> Result<Response, HttpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let max = self.max_answer;
        let request = self
            .build(addr, false)
            .map_err(|source| HttpError::Request {
                addr,
                what: what.to_owned(),
                source,
            })?;
        let failed = |e: hyper::Error| classify(addr, what, e);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(failed)?;
        let answer = answer_of(&mut sender, request, addr, what, max);
        // The connection makes progress only while polled; it ends after the answer
        // (`Connection: close`), or with the error the request also sees.
        let mut conn = pin!(conn);
        let mut answer = pin!(answer);
        tokio::select! {
            r = &mut answer => r,
            c = &mut conn => {
                c.map_err(failed)?;
                answer.await
            }
        }
    }
}

/// Sends `request` on `sender` and reads its whole answer, up to `max` bytes of body.
async fn answer_of(
    sender: &mut hyper::client::conn::http1::SendRequest<ReqBody>,
    request: hyper::Request<ReqBody>,
    addr: SocketAddr,
    what: &str,
    max: usize,
) -> Result<Response, HttpError> {
    let failed = |e: hyper::Error| classify(addr, what, e);
    let answer = sender.send_request(request).await.map_err(failed)?;
    let (parts, body) = answer.into_parts();
    let body = Limited::new(body, max)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => failed(*e),
            Err(_) => HttpError::Protocol {
                addr,
                what: what.to_owned(),
                source: ProtocolError::TooLarge { limit: max },
            },
        })?
        .to_bytes();
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// An HTTP/1.1 connection kept open between requests ([`Request::send_kept`]): a watch's
/// long polls, one after the other, pay for one TCP connect and one TLS handshake (with its
/// certificate signatures on both sides) in all instead of one per change. With a thousand
/// watchers, those handshakes were most of a change's cost on the gateway. One request at a
/// time; a connection whose request failed or timed out is not reused (its state is unknown).
pub struct KeptConnection {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<ReqBody>,
    /// Polls the connection (hyper's side of it) until it closes; aborted with this.
    driver: tokio::task::JoinHandle<()>,
    alert: Option<Arc<std::sync::Mutex<Option<rustls::Error>>>>,
}

impl std::fmt::Debug for KeptConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptConnection")
            .field("addr", &self.addr)
            .field("closed", &self.sender.is_closed())
            .finish()
    }
}

impl Drop for KeptConnection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl KeptConnection {
    /// The address it is connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the peer (or an error) closed it: a request would fail at once.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.driver.is_finished()
    }
}

impl Request {
    /// Opens a connection to `addr` that stays open between requests (see
    /// [`KeptConnection`]), with this request's TLS identity and connect deadline. Within
    /// the request's deadline.
    pub async fn open_kept(&self, addr: SocketAddr) -> Result<KeptConnection, HttpError> {
        let what = self.what();
        let open = async {
            let Connection {
                addr,
                stream,
                alert,
            } = self.connect(addr).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| classify(addr, &what, e))?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(KeptConnection {
                addr,
                sender,
                driver,
                alert,
            })
        };
        within(self.timeout, addr, &what, open).await
    }

    /// Sends the request on `conn` (without `Connection: close`) and reads the whole answer,
    /// within the request's deadline. Gives the connection back for the next request if the
    /// exchange completed and the peer keeps it open; otherwise it is dropped.
    pub async fn send_kept(
        self,
        mut conn: KeptConnection,
    ) -> (Result<Response, HttpError>, Option<KeptConnection>) {
        let (what, addr, timeout, max) = (self.what(), conn.addr, self.timeout, self.max_answer);
        let request = match self.build(addr, true) {
            Ok(r) => r,
            Err(source) => {
                let e = HttpError::Request {
                    addr,
                    what: what.clone(),
                    source,
                };
                return (Err(e), Some(conn));
            }
        };
        let r = within(
            timeout,
            addr,
            &what,
            answer_of(&mut conn.sender, request, addr, &what, max),
        )
        .await;
        match blame_alert(r, conn.alert.as_ref(), addr) {
            Err(e) => (Err(e), None),
            Ok(resp) => {
                let closing = resp
                    .headers
                    .get(CONNECTION)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                let keep = (!closing && !conn.is_closed()).then_some(conn);
                (Ok(resp), keep)
            }
        }
    }
}

/// A failed exchange on a TLS stream that recorded an alert fails for that alert (in TLS 1.3
/// the server judges the client's certificate after the client's handshake is over, so its
/// alert may surface in hyper as any failure).
fn blame_alert<T>(
    r: Result<T, HttpError>,
    alert: Option<&Arc<std::sync::Mutex<Option<rustls::Error>>>>,
    addr: SocketAddr,
) -> Result<T, HttpError> {
    let seen = alert.and_then(|a| a.lock().unwrap_or_else(|p| p.into_inner()).take());
    match (r, seen) {
        (Err(_), Some(e)) => {
            Err(tls_error(addr, &io::Error::other(e)).expect("a rustls error is a TLS error"))
        }
        (r, _) => r,
    }
}

/// `exchange` within `timeout` (none: as long as it takes).
async fn within<T>(
    timeout: Option<Duration>,
    addr: SocketAddr,
    what: &str,
    exchange: impl Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    match timeout {
        None => exchange.await,
        Some(timeout) => {
            tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| HttpError::Timeout {
                    addr,
                    what: what.to_owned(),
                    timeout,
                })?
        }
    }
}

type ReqBody = BoxBody<Bytes, io::Error>;

/// A socket error (the peer reset, a write failed) is [`HttpError::Io`]; anything else hyper
/// refuses (a malformed or truncated answer) is [`HttpError::Protocol`].
fn classify(addr: SocketAddr, what: &str, e: hyper::Error) -> HttpError {
    let io = std::error::Error::source(&e).and_then(|c| c.downcast_ref::<io::Error>());
    if let Some(tls) = io.and_then(|io| tls_error(addr, io)) {
        return tls;
    }
    if let Some(io) = io.filter(|io| io.kind() == io::ErrorKind::UnexpectedEof) {
        return HttpError::Protocol {
            addr,
            what: what.to_owned(),
            source: ProtocolError::Truncated {
                reason: io.to_string(),
            },
        };
    }
    if let Some(io) = io.filter(|_| !e.is_parse()) {
        return HttpError::Io {
            addr,
            what: what.to_owned(),
            // hyper lends its cause only: keep the socket error's kind and words.
            source: io::Error::new(io.kind(), io.to_string()),
        };
    }
    HttpError::Protocol {
        addr,
        what: what.to_owned(),
        source: ProtocolError::Http(e),
    }
}

/// A TLS stream that keeps the first TLS error its reads and writes met.
struct Recorded<S> {
    inner: S,
    error: Arc<std::sync::Mutex<Option<rustls::Error>>>,
}

impl<S> Recorded<S> {
    fn note<T>(&self, r: std::task::Poll<io::Result<T>>) -> std::task::Poll<io::Result<T>> {
        if let std::task::Poll::Ready(Err(e)) = &r
            && let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            let mut seen = self.error.lock().unwrap_or_else(|p| p.into_inner());
            seen.get_or_insert_with(|| tls.clone());
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.note(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.note(r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.note(r)
    }
}

/// A TLS failure behind an I/O error, with a hint at the usual cause.
fn tls_error(addr: SocketAddr, io: &io::Error) -> Option<HttpError> {
    let e = io.get_ref()?.downcast_ref::<rustls::Error>()?;
    let hint = match e {
        rustls::Error::AlertReceived(_) => {
            " (the server refused this client: is its certificate issued by the cluster's CA, \
             still valid, and for the identity that may make this request?)"
        }
        rustls::Error::InvalidCertificate(_) => {
            " (the server's certificate: is it issued by the cluster's CA, still valid, and \
             does it name the address connected to?)"
        }
        _ => "",
    };
    Some(HttpError::Tls {
        addr,
        reason: e.to_string(),
        hint,
    })
}

/// Writes a streamed request body (see [`Request::stream`]).
#[derive(Debug)]
pub struct BodyWriter {
    tx: http_body_util::channel::Sender<Bytes, io::Error>,
}

/// The request a [`BodyWriter`] writes to is over (answered early, or failed): its outcome is
/// [`Request::send`]'s.
#[derive(Debug, thiserror::Error)]
#[error("the request no longer takes body data")]
pub struct BodyClosed;

impl BodyWriter {
    pub async fn write(&mut self, data: impl Into<Bytes>) -> Result<(), BodyClosed> {
        self.tx.send_data(data.into()).await.map_err(|_| BodyClosed)
    }

    /// Abandons the body: the request fails with `error` (the connection is closed before the
    /// announced length was sent, so the peer cannot take it as complete).
    pub fn abort(self, error: io::Error) {
        self.tx.abort(error)
    }
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// An error answer as [`ApiError::Http`] (its [`crate::ErrorBody`] decoded if it is one).
    pub fn error(&self) -> ApiError {
        http_error(self.status, &self.body)
    }

    /// A 2xx answer's JSON body as `T`; an error answer as [`Response::error`]. `what` names
    /// the request in a decoding error.
    pub fn json<T: DeserializeOwned>(&self, what: &str) -> Result<T, ApiError> {
        if !self.is_success() {
            return Err(self.error());
        }
        serde_json::from_slice(&self.body).map_err(|source| ApiError::Decode {
            what: format!("the answer to {what}"),
            source,
        })
    }
}

/// Runs `f` to completion on a new current-thread runtime (with I/O and timers): how synchronous
/// code (the lab, tests, a thread inside a network namespace) makes requests.
pub fn block_on<F: Future>(f: F) -> io::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    /// A one-shot server: reads the request head and `body_len` body bytes, then answers in
    /// two writes (the client must put the halves together); returns the request.
    pub(crate) async fn server(
        answer: &'static [u8],
        body_len: usize,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = Vec::new();
            let mut b = vec![0u8; 64 * 1024];
            loop {
                let head = req.windows(4).position(|w| w == b"\r\n\r\n");
                if head.is_some_and(|h| req.len() >= h + 4 + body_len) {
                    break;
                }
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "the client closed early");
                req.extend_from_slice(&b[..n]);
            }
            let mid = answer.len() / 2;
            s.write_all(&answer[..mid]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(&answer[mid..]).await.unwrap();
            req
        });
        (addr, h)
    }

    #[tokio::test]
    async fn chunked_answers_and_headers_arrive() {
        let (addr, h) = server(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n",
            2,
        )
        .await;
        let r = Request::post("/x?y=1")
            .token("tok")
            .json("{}")
            .send(addr)
            .await
            .unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"Wikipedia"[..]));
        assert_eq!(r.headers["x-a"], "b");
        let req = String::from_utf8(h.await.unwrap()).unwrap().to_lowercase();
        assert!(req.starts_with("post /x?y=1 http/1.1\r\n"), "{req}");
        for line in [
            "authorization: bearer tok\r\n",
            "content-type: application/json\r\n",
            "content-length: 2\r\n",
            "connection: close\r\n",
            &format!("host: {addr}\r\n"),
        ] {
            assert!(req.contains(line), "{line:?} missing: {req}");
        }
    }

    #[tokio::test]
    async fn a_post_without_body_says_so() {
        let (addr, h) = server(b"HTTP/1.1 204 No Content\r\n\r\n", 0).await;
        let r = Request::post("/x").send(addr).await.unwrap();
        assert_eq!(r.status, 204);
        let req = String::from_utf8(h.await.unwrap()).unwrap().to_lowercase();
        assert!(req.contains("content-length: 0\r\n"), "{req}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let (addr, _h) = server(
            b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n01234567890123456789",
            0,
        )
        .await;
        let e = Request::get("/x")
            .max_answer(10)
            .send(addr)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                HttpError::Protocol {
                    source: ProtocolError::TooLarge { limit: 10 },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let (addr, _h) = server(b"SSH-2.0-OpenSSH\r\n\r\n", 0).await;
        let e = Request::get("/x").send(addr).await.unwrap_err();
        assert!(matches!(e, HttpError::Protocol { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_streamed_body_arrives_whole_with_its_length() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (addr, h) = server(
            b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            data.len(),
        )
        .await;
        let (req, mut w) = Request::post("/up").stream(data.len() as u64);
        let chunks = data.clone();
        let write = async move {
            for c in chunks.chunks(65_536) {
                w.write(Bytes::copy_from_slice(c)).await.unwrap();
            }
        };
        let (r, ()) = tokio::join!(req.send(addr), write);
        let r = r.unwrap();
        assert_eq!((r.status, &r.body[..]), (201, &b"ok"[..]));
        let got = h.await.unwrap();
        let head = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let text = String::from_utf8_lossy(&got[..head]).to_lowercase();
        assert!(
            text.contains(&format!("content-length: {}\r\n", data.len())),
            "{text}"
        );
        assert_eq!(&got[head..], &data[..]);
    }

    /// A server that reads one connection to its end and returns what it got.
    async fn read_all_server() -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            all
        });
        (addr, server)
    }

    #[tokio::test]
    async fn an_aborted_stream_fails_the_request() {
        let (addr, server) = read_all_server().await;
        let (req, mut w) = Request::post("/up").stream(100);
        let write = async move {
            w.write(&b"0123456789"[..]).await.unwrap();
            w.abort(io::Error::other("the file vanished"));
        };
        let (r, ()) = tokio::join!(req.send(addr), write);
        let e = r.unwrap_err();
        assert!(
            matches!(e, HttpError::Io { .. } | HttpError::Protocol { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("the file vanished"), "{e}");
        // The peer saw the connection end before the announced 100 bytes.
        let got = server.await.unwrap();
        let body = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |h| got.len() - h - 4);
        assert!(body < 100, "{body}");
    }

    /// The request's head reaches the server before a byte of the body is written; the body
    /// then arrives chunked and whole.
    #[tokio::test]
    async fn a_chunked_body_follows_a_head_sent_ahead() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (head_tx, head_rx) = tokio::sync::oneshot::channel::<String>();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut b = vec![0u8; 64 * 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "the client closed early");
                got.extend_from_slice(&b[..n]);
            }
            let _ = head_tx.send(String::from_utf8_lossy(&got).to_lowercase());
            while !got.ends_with(b"0\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "the client closed before the last chunk");
                got.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            got
        });
        let (req, mut w) = Request::post("/up").stream_chunked();
        let answer = tokio::spawn(req.send(addr));
        // Nothing written yet: the head alone is already there.
        let head = head_rx.await.unwrap();
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        w.write(&b"hello "[..]).await.unwrap();
        w.write(&b"world"[..]).await.unwrap();
        drop(w);
        let r = answer.await.unwrap().unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
        let got = server.await.unwrap();
        let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(body, b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n");
    }

    /// An aborted chunked body never gets its last chunk: the peer cannot take it as whole.
    #[tokio::test]
    async fn an_aborted_chunked_stream_has_no_last_chunk() {
        let (addr, server) = read_all_server().await;
        let (req, mut w) = Request::post("/up").stream_chunked();
        let write = async move {
            w.write(&b"0123456789"[..]).await.unwrap();
            w.abort(io::Error::other("the dump failed"));
        };
        let (r, ()) = tokio::join!(req.send(addr), write);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("the dump failed"), "{e}");
        let got = server.await.unwrap();
        assert!(
            !got.ends_with(b"0\r\n\r\n"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }

    #[test]
    fn blocking_requests_run_on_their_own_runtime() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 4096];
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                req.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 62\r\n\r\n{\"error\":{\"code\":\"unknown_host\",\"message\":\"no host named x1\"}}")
                .unwrap();
        });
        let r = Request::get("/v1/hosts/x1").send_blocking(addr).unwrap();
        t.join().unwrap();
        let e = r.json::<serde_json::Value>("GET /v1/hosts/x1").unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(404), Some("unknown_host")));
    }
}
