//! The image stream between agents: the source sends a dump directory to the destination's
//! `POST /v1/images/{migration}` as one HTTP body, written to disk as it arrives (no directory
//! is shared between hosts). The stream starts before the dump: the header at once, then each
//! page file (`pages-*.img`, which CRIU writes strictly in order) while CRIU writes it, so the
//! memory crosses the link while the dump goes on; the other files follow once the dump is
//! done ([`Opened::stream`], [`Streaming::finish`]).
//!
//! ```text
//! "FERRYIMG2\n" | u32 BE L | L bytes JSON Header
//! then frames:
//!   1 | u16 BE n (1..=255) | n bytes name | u64 BE offset | u32 BE len (1..=1 MiB) | len bytes
//!   2 | u16 BE n | n bytes name | u64 BE size        (the file is complete: exactly size bytes)
//!   0                                               (the end: every file named was completed)
//! ```
//!
//! A file's data frames come in order (each starts where the previous one ended); frames of
//! different files may interleave. Names are plain file names (no `/`, not `.` or `..`); a
//! stream with anything else, a frame out of order, a file named again after it was
//! completed, more than [`MAX_FILES`] files or [`MAX_OPEN`] incomplete at once, or more than
//! the receiver's byte limit is refused, and what was written is removed by the caller.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use ferry_api::{
    run::{LockMode, RuntimeKind},
    transport::{BodyClosed, BodyWriter, HttpError, Request, Response},
};
use futures::{FutureExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tracing::{Instrument as _, warn};

pub const MAGIC: &[u8] = b"FERRYIMG2\n";
pub const MAX_FILES: u32 = 100_000;
/// Files begun and not yet completed, at most (the sender has a few page files at once).
pub const MAX_OPEN: usize = 64;
const MAX_HEADER: u32 = 64 * 1024;
/// The largest data frame accepted.
pub const MAX_FRAME: usize = 1 << 20;
const FRAME_END: u8 = 0;
const FRAME_DATA: u8 = 1;
const FRAME_CLOSE: u8 = 2;

/// What travels ahead of the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub migration: String,
    pub container: Ipv4Addr,
    pub from: String,
    pub lock: LockMode,
    /// The container's command line (for the destination's runtime).
    pub argv: Vec<String>,
    /// Fault injection: the restore fails on purpose.
    #[serde(default)]
    pub fail_restore: bool,
    /// The runtime that ran it at the source, and restores it here.
    #[serde(default, skip_serializing_if = "RuntimeKind::is_agent")]
    pub runtime: RuntimeKind,
    /// Its root file system (runc): the destination must have the same image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Lazy memory: the images hold no page content; the destination pulls the pages from
    /// this page server (see `super::lazy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<super::lazy::LazySource>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not an image stream (bad magic)")]
    Magic,
    #[error("image stream header: {0}")]
    Header(String),
    #[error("bad file name {0:?} in the image stream")]
    Name(String),
    #[error("unknown frame kind {0} in the image stream")]
    Frame(u8),
    #[error("a data frame of {len} bytes for {name} (1 to {MAX_FRAME} allowed)")]
    FrameLength { name: String, len: u32 },
    #[error("{name}: data at offset {got}, expected {expected} (frames out of order)")]
    Offset {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("{name} was closed at {size} bytes, but {written} were received")]
    Size {
        name: String,
        size: u64,
        written: u64,
    },
    #[error("{0} is named again after it was completed")]
    AfterClose(String),
    #[error("{0} was never completed before the end of the image stream")]
    Unclosed(String),
    #[error("more than {MAX_OPEN} files incomplete at once in the image stream")]
    TooManyOpen,
    #[error("more than {MAX_FILES} files in the image stream")]
    TooManyFiles,
    #[error("image stream larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("image stream truncated ({0})")]
    Truncated(&'static str),
    #[error("data after the end of the image stream")]
    Trailing,
    #[error("writing {path}: {error}")]
    Io { path: String, error: String },
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
}

/// What a frame carries (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Data,
    Close,
}

enum State {
    Magic,
    HeaderLen,
    Header(usize),
    Kind,
    NameLen(Frame),
    Name(Frame, usize),
    DataHead(String),
    Data { name: String, remaining: u32 },
    CloseSize(String),
    Done,
}

/// A file being received: where its next byte goes.
struct Incoming {
    file: std::fs::File,
    written: u64,
}

/// A push parser that writes the files into `dir` as the bytes arrive.
pub struct Receiver {
    dir: PathBuf,
    limit: u64,
    state: State,
    buf: Vec<u8>,
    open: HashMap<String, Incoming>,
    closed: HashSet<String>,
    pub header: Option<Header>,
    pub files: u32,
    pub bytes: u64,
}

impl Receiver {
    pub fn new(dir: &Path, limit: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            limit,
            state: State::Magic,
            buf: Vec::new(),
            open: HashMap::new(),
            closed: HashSet::new(),
            header: None,
            files: 0,
            bytes: 0,
        }
    }

    /// Takes `need` bytes from `buf` + `data` once available.
    fn take(&mut self, data: &mut &[u8], need: usize) -> Option<Vec<u8>> {
        let want = need - self.buf.len().min(need);
        let n = want.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        *data = &data[n..];
        (self.buf.len() == need).then(|| std::mem::take(&mut self.buf))
    }

    /// The file `name` for its next frame: open already, or created now (a new name).
    fn incoming(&mut self, name: &str) -> Result<&mut Incoming, ImageError> {
        if self.closed.contains(name) {
            return Err(ImageError::AfterClose(name.to_owned()));
        }
        if !self.open.contains_key(name) {
            self.files += 1;
            if self.files > MAX_FILES {
                return Err(ImageError::TooManyFiles);
            }
            if self.open.len() >= MAX_OPEN {
                return Err(ImageError::TooManyOpen);
            }
            let path = self.dir.join(name);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| ImageError::Io {
                    path: path.display().to_string(),
                    error: e.to_string(),
                })?;
            self.open
                .insert(name.to_owned(), Incoming { file, written: 0 });
        }
        Ok(self.open.get_mut(name).expect("just inserted"))
    }

    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ImageError> {
        self.bytes += data.len() as u64;
        if self.bytes > self.limit {
            return Err(ImageError::TooLarge { limit: self.limit });
        }
        while !data.is_empty() {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Magic => match self.take(&mut data, MAGIC.len()) {
                    Some(m) if m == MAGIC => self.state = State::HeaderLen,
                    Some(_) => return Err(ImageError::Magic),
                    None => self.state = State::Magic,
                },
                State::HeaderLen => match self.take(&mut data, 4) {
                    Some(b) => {
                        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        if n == 0 || n > MAX_HEADER {
                            return Err(ImageError::Header(format!("length {n}")));
                        }
                        self.state = State::Header(n as usize);
                    }
                    None => self.state = State::HeaderLen,
                },
                State::Header(n) => match self.take(&mut data, n) {
                    Some(b) => {
                        let h: Header = serde_json::from_slice(&b)
                            .map_err(|e| ImageError::Header(e.to_string()))?;
                        self.header = Some(h);
                        self.state = State::Kind;
                    }
                    None => self.state = State::Header(n),
                },
                State::Kind => {
                    let kind = data[0];
                    data = &data[1..];
                    self.state = match kind {
                        FRAME_END => {
                            if let Some(name) = self.open.keys().min() {
                                return Err(ImageError::Unclosed(name.clone()));
                            }
                            if !data.is_empty() {
                                return Err(ImageError::Trailing);
                            }
                            return Ok(());
                        }
                        FRAME_DATA => State::NameLen(Frame::Data),
                        FRAME_CLOSE => State::NameLen(Frame::Close),
                        k => return Err(ImageError::Frame(k)),
                    };
                }
                State::NameLen(f) => match self.take(&mut data, 2) {
                    Some(b) => {
                        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
                        if n == 0 || n > 255 {
                            return Err(ImageError::Name(format!("(a name of {n} bytes)")));
                        }
                        self.state = State::Name(f, n);
                    }
                    None => self.state = State::NameLen(f),
                },
                State::Name(f, n) => match self.take(&mut data, n) {
                    Some(b) => {
                        let name = String::from_utf8(b)
                            .map_err(|e| ImageError::Name(format!("{:?}", e.as_bytes())))?;
                        if !valid_name(&name) {
                            return Err(ImageError::Name(name));
                        }
                        self.state = match f {
                            Frame::Data => State::DataHead(name),
                            Frame::Close => State::CloseSize(name),
                        };
                    }
                    None => self.state = State::Name(f, n),
                },
                State::DataHead(name) => match self.take(&mut data, 12) {
                    Some(b) => {
                        let offset = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                        let len = u32::from_be_bytes(b[8..].try_into().expect("4 bytes"));
                        if len == 0 || len as usize > MAX_FRAME {
                            return Err(ImageError::FrameLength { name, len });
                        }
                        let f = self.incoming(&name)?;
                        if offset != f.written {
                            return Err(ImageError::Offset {
                                name,
                                expected: f.written,
                                got: offset,
                            });
                        }
                        if offset.saturating_add(u64::from(len)) > self.limit {
                            return Err(ImageError::TooLarge { limit: self.limit });
                        }
                        self.state = State::Data {
                            name,
                            remaining: len,
                        };
                    }
                    None => self.state = State::DataHead(name),
                },
                State::Data { name, remaining } => {
                    let n = (remaining as usize).min(data.len());
                    let f = self
                        .open
                        .get_mut(&name)
                        .expect("a data frame's file is open");
                    f.file.write_all(&data[..n]).map_err(|e| ImageError::Io {
                        path: name.clone(),
                        error: e.to_string(),
                    })?;
                    f.written += n as u64;
                    data = &data[n..];
                    let left = remaining - n as u32;
                    self.state = if left == 0 {
                        State::Kind
                    } else {
                        State::Data {
                            name,
                            remaining: left,
                        }
                    };
                }
                State::CloseSize(name) => match self.take(&mut data, 8) {
                    Some(b) => {
                        let size = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                        let written = self.incoming(&name)?.written;
                        if size != written {
                            return Err(ImageError::Size {
                                name,
                                size,
                                written,
                            });
                        }
                        // Closed: the file is complete; no frame may name it again.
                        self.open.remove(&name);
                        self.closed.insert(name);
                        self.state = State::Kind;
                    }
                    None => self.state = State::CloseSize(name),
                },
                State::Done => return Err(ImageError::Trailing),
            }
        }
        Ok(())
    }

    /// The stream ended: it must have ended cleanly.
    pub fn finish(&self) -> Result<&Header, ImageError> {
        match self.state {
            State::Done => self
                .header
                .as_ref()
                .ok_or(ImageError::Truncated("no header")),
            _ if !self.open.is_empty() => Err(ImageError::Truncated("inside a file")),
            _ => Err(ImageError::Truncated("before the end marker")),
        }
    }
}

/// The files of a dump directory to send (logs and pid files stay behind), with sizes.
pub fn list(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type()?.is_file() || name.ends_with(".log") || !valid_name(&name) {
            continue;
        }
        files.push((name, e.metadata()?.len()));
    }
    files.sort();
    Ok(files)
}

/// Files CRIU writes strictly in order, from empty to complete (`pages-*.img`: opened with
/// `O_TRUNC`, then written page after page): they are sent while they grow. Every other file
/// is sent once the dump is done.
pub fn grows_in_order(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Encodes the fixed parts ahead of the frames: magic, header length, header.
fn encode_header(h: &Header) -> Vec<u8> {
    let json = serde_json::to_vec(h).expect("a header encodes");
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// A data frame's head for `name`: kind, name length, name, offset, length.
fn data_head_len(name: &str) -> u64 {
    1 + 2 + name.len() as u64 + 8 + 4
}

/// A close frame for `name`: kind, name length, name, size.
fn close_len(name: &str) -> u64 {
    1 + 2 + name.len() as u64 + 8
}

/// Encodes a data frame's head; its `len` bytes follow.
fn encode_data_head(out: &mut Vec<u8>, name: &str, offset: u64, len: u32) {
    out.push(FRAME_DATA);
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Encodes the frame that completes `name` at `size` bytes.
fn encode_close(name: &str, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(close_len(name) as usize);
    out.push(FRAME_CLOSE);
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out
}

/// A whole stream in memory: `files` (name, bytes) one after the other, in data frames of at
/// most [`CHUNK`] bytes. For tests and tools; [`Opened::stream`] streams from disk instead.
pub fn encode_stream(h: &Header, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = encode_header(h);
    for (n, b) in files {
        let mut at = 0usize;
        for piece in b.chunks(CHUNK) {
            encode_data_head(&mut out, n, at as u64, piece.len() as u32);
            out.extend_from_slice(piece);
            at += piece.len();
        }
        out.extend(encode_close(n, b.len() as u64));
    }
    out.push(FRAME_END);
    out
}

/// Why the images did not reach the destination (or its answer did not come back).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("listing {}: {source}", dir.display())]
    List {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("opening {name}: {source}")]
    Open {
        name: String,
        source: std::io::Error,
    },
    #[error("reading {name}: {source}")]
    Read {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} shrank while being sent")]
    Shrank { name: String },
    #[error("{name} went away after {sent} of its bytes were sent")]
    Vanished { name: String, sent: u64 },
    #[error("sending the images: {0}")]
    Http(#[from] ferry_api::transport::HttpError),
    #[error("the image stream's task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a send achieved.
pub struct Sent {
    pub bytes: u64,
    pub files: u32,
    /// Handed to the connection before the dump was done: the page files as CRIU wrote them
    /// (their frames; the stream's header not counted).
    pub during_dump: u64,
    /// From the dump's end until the last byte was handed to the connection (at most two
    /// frames queued).
    pub send_ms: f64,
    pub status: u16,
    pub body: Vec<u8>,
}

/// An image stream's request, opened before the dump: the TCP connection, its TLS handshake
/// and the request's head cross the link while the source drains, so the frozen container
/// does not wait for them (across a WAN they are two to three round trips). The body (its
/// length unknown until the dump is done: chunked) is written by [`Opened::stream`].
/// Dropped before the stream's end (the dump failed, the run ended early), the body is
/// aborted: the destination sees an incomplete stream and restores nothing.
pub struct Opened {
    answer: tokio::task::JoinHandle<Result<Response, HttpError>>,
    body: Option<BodyWriter>,
}

/// How long opening the images' connection (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens `POST /v1/images/{migration}` to `addr` (see [`Opened`]): returns once the
/// connection and its TLS handshake are done and the request's head is on its way, or with
/// why the destination could not be reached (within [`CONNECT_TIMEOUT`]).
pub async fn open(addr: SocketAddr, token: &str, migration: &str) -> Result<Opened, HttpError> {
    // No deadline on the exchange: the destination answers once it restored the container.
    let (request, body) = Request::post(format!("/v1/images/{migration}"))
        .token(token)
        .header("Content-Type", "application/octet-stream")
        .without_timeout()
        .max_answer(1 << 20)
        .stream_chunked();
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, request.connect(addr))
        .await
        .map_err(|_| HttpError::Timeout {
            addr,
            what: request.what(),
            timeout: CONNECT_TIMEOUT,
        })??;
    Ok(Opened {
        answer: tokio::spawn(request.send_over(conn).in_current_span()),
        body: Some(body),
    })
}

/// How far a stream got: `progress(sent, total)`, the total known once the dump is done.
pub type Progress = Box<dyn FnMut(u64, Option<u64>) + Send>;

impl Opened {
    /// Starts streaming `dir`, which a dump is about to write: the header now, each page file
    /// as it grows (an inotify watch on `dir`), the rest once [`Streaming::finish`] says the
    /// dump is done. `progress` is called every 4 MiB and at the end.
    pub fn stream(self, header: Header, dir: PathBuf, progress: Progress) -> Streaming {
        let (done, dumped) = tokio::sync::oneshot::channel();
        let handed = Arc::new(AtomicU64::new(0));
        let head = encode_header(&header).len() as u64;
        let counter = handed.clone();
        let task = tokio::spawn(
            async move {
                let mut out = Out {
                    opened: self,
                    handed: counter,
                    next_report: 4 << 20,
                    progress,
                    total: None,
                };
                out.run(&header, &dir, dumped).await
            }
            .in_current_span(),
        );
        Streaming {
            done: Some(done),
            task,
            handed,
            head,
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some(body) = self.body.take() {
            body.abort(std::io::Error::other(
                "the checkpoint ended before its images were sent",
            ));
        }
        self.answer.abort();
    }
}

/// An image stream under way (see [`Opened::stream`]). Dropped before [`Streaming::finish`]
/// (the dump failed, the checkpoint gave up), it stops and aborts the request's body.
pub struct Streaming {
    done: Option<tokio::sync::oneshot::Sender<Instant>>,
    task: tokio::task::JoinHandle<Result<Sent, SendError>>,
    /// Bytes handed to the connection so far (the task counts them).
    handed: Arc<AtomicU64>,
    /// The header's share of them.
    head: u64,
}

impl Streaming {
    /// The dump is done and nothing more will be written to the directory: sends what is
    /// left, ends the stream and waits for the destination's answer (it answers once it
    /// restored).
    pub async fn finish(mut self) -> Result<Sent, SendError> {
        // What crossed during the dump: counted now, whatever the task is busy with.
        let during_dump = self.handed.load(Ordering::SeqCst).saturating_sub(self.head);
        if let Some(done) = self.done.take() {
            let _ = done.send(Instant::now());
        }
        let mut sent = (&mut self.task).await??;
        sent.during_dump = during_dump.min(sent.bytes);
        Ok(sent)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // Not finished (or `finish` itself dropped half way): the task's `Opened` aborts the
        // body as it is dropped. A task that ended is not affected.
        self.task.abort();
    }
}

/// Why the image writer stopped early.
enum Stop {
    /// The request is over (answered early or failed): its outcome says why.
    Closed,
    Failed(SendError),
}

impl From<BodyClosed> for Stop {
    fn from(_: BodyClosed) -> Self {
        Stop::Closed
    }
}

impl From<SendError> for Stop {
    fn from(e: SendError) -> Self {
        Stop::Failed(e)
    }
}

/// The writing side of a stream.
struct Out {
    opened: Opened,
    /// Bytes handed to the connection (shared with [`Streaming::finish`]).
    handed: Arc<AtomicU64>,
    next_report: u64,
    progress: Progress,
    total: Option<u64>,
}

impl Out {
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), Stop> {
        let n = bytes.len() as u64;
        self.opened
            .body
            .as_mut()
            .expect("the body is open until the stream ends")
            .write(bytes)
            .await?;
        let sent = self.handed.fetch_add(n, Ordering::SeqCst) + n;
        if sent >= self.next_report {
            (self.progress)(sent, self.total);
            self.next_report = sent + (4 << 20);
        }
        Ok(())
    }

    fn sent(&self) -> u64 {
        self.handed.load(Ordering::SeqCst)
    }

    /// Sends bytes `from..to` of `dir/name` as data frames.
    async fn send_range(&mut self, dir: &Path, name: &str, from: u64, to: u64) -> Result<(), Stop> {
        if from >= to {
            return Ok(());
        }
        let mut f = tokio::fs::File::open(dir.join(name))
            .await
            .map_err(|source| SendError::Open {
                name: name.to_owned(),
                source,
            })?;
        let read_err = |source| SendError::Read {
            name: name.to_owned(),
            source,
        };
        f.seek(std::io::SeekFrom::Start(from))
            .await
            .map_err(read_err)?;
        let mut at = from;
        while at < to {
            let want = CHUNK.min((to - at) as usize);
            let mut frame = Vec::with_capacity(data_head_len(name) as usize + want);
            encode_data_head(&mut frame, name, at, want as u32);
            let head = frame.len();
            frame.resize(head + want, 0);
            let mut got = 0;
            while got < want {
                let n = f.read(&mut frame[head + got..]).await.map_err(read_err)?;
                if n == 0 {
                    return Err(SendError::Shrank {
                        name: name.to_owned(),
                    }
                    .into());
                }
                got += n;
            }
            self.write(frame).await?;
            at += want as u64;
        }
        Ok(())
    }

    /// While the dump runs: each page file as it grows. Returns with the dump's end.
    ///
    /// The directory is watched for new files only, each page file then for its writes: a
    /// watch on the directory's writes would also wake the agent at every line of CRIU's log,
    /// written line by line into the same directory, taking CPU from the dump.
    async fn while_dumping(
        &mut self,
        dir: &Path,
        sent: &mut BTreeMap<String, u64>,
        dumped: &mut tokio::sync::oneshot::Receiver<Instant>,
    ) -> Result<Instant, Stop> {
        // A dropped sender aborts the task before this can fail.
        let end = |t: Result<Instant, _>| t.unwrap_or_else(|_| Instant::now());
        let events = inotify::Inotify::init().and_then(|i| {
            i.watches().add(
                dir,
                inotify::WatchMask::CREATE | inotify::WatchMask::MOVED_TO,
            )?;
            i.into_event_stream(vec![0u8; 4096])
        });
        let mut events = match events {
            Ok(e) => e,
            Err(e) => {
                // Not fatal: the images are then all sent after the dump.
                warn!(error = %e, dir = %dir.display(), "cannot watch the dump directory");
                return Ok(end(dumped.await));
            }
        };
        let page_files = |dir: &Path| -> Result<Vec<String>, Stop> {
            Ok(list(dir)
                .map_err(|source| SendError::List {
                    dir: dir.to_owned(),
                    source,
                })?
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| grows_in_order(n))
                .collect())
        };
        let mut watched: HashMap<inotify::WatchDescriptor, String> = HashMap::new();
        // Those written before the watch began, first.
        let mut todo: BTreeSet<String> = page_files(dir)?.into_iter().collect();
        loop {
            for name in std::mem::take(&mut todo) {
                if !watched.values().any(|n| *n == name) {
                    // If the watch cannot be added, what the file gains goes after the dump.
                    if let Ok(wd) = events.watches().add(
                        dir.join(&name),
                        inotify::WatchMask::MODIFY | inotify::WatchMask::CLOSE_WRITE,
                    ) {
                        watched.insert(wd, name.clone());
                    }
                }
                self.grow_one(dir, name, sent).await?;
            }
            tokio::select! {
                biased;
                t = &mut *dumped => return Ok(end(t)),
                e = events.next() => {
                    let Some(e) = e else {
                        return Ok(end(dumped.await));
                    };
                    // This event and those queued behind it.
                    let mut all = false;
                    let mut note = |e: std::io::Result<inotify::Event<std::ffi::OsString>>| match e {
                        Ok(e) if e.mask.contains(inotify::EventMask::Q_OVERFLOW) => all = true,
                        Ok(e) => match e.name.map(|n| n.into_string()) {
                            // A file created in the directory.
                            Some(Ok(n)) if grows_in_order(&n) => {
                                todo.insert(n);
                            }
                            Some(_) => {}
                            // A page file written to.
                            None => {
                                if let Some(n) = watched.get(&e.wd) {
                                    todo.insert(n.clone());
                                }
                            }
                        },
                        Err(_) => all = true,
                    };
                    note(e);
                    while let Some(Some(e)) = events.next().now_or_never() {
                        note(e);
                    }
                    if all {
                        todo.extend(page_files(dir)?);
                    }
                }
            }
        }
    }

    /// Sends what the page file `name` gained since the last look.
    async fn grow_one(
        &mut self,
        dir: &Path,
        name: String,
        sent: &mut BTreeMap<String, u64>,
    ) -> Result<(), Stop> {
        let size = match std::fs::metadata(dir.join(&name)) {
            Ok(m) => m.len(),
            // Gone already: the final pass says whether that matters.
            Err(_) => return Ok(()),
        };
        let from = sent.get(&name).copied().unwrap_or(0);
        if size < from {
            return Err(SendError::Shrank { name }.into());
        }
        self.send_range(dir, &name, from, size).await?;
        sent.insert(name, size);
        Ok(())
    }

    /// The whole stream; the dump's end arrives on `dumped`.
    async fn run(
        &mut self,
        header: &Header,
        dir: &Path,
        mut dumped: tokio::sync::oneshot::Receiver<Instant>,
    ) -> Result<Sent, SendError> {
        let mut sent_files = BTreeMap::new();
        let mut files = 0;
        let mut dump_end = Instant::now();
        let written = async {
            self.write(encode_header(header)).await?;
            // While the dump runs: the page files as they grow.
            // While the dump runs: the page files as they grow.
            dump_end = self
                .while_dumping(dir, &mut sent_files, &mut dumped)
                .await?;
            // The dump is done: every file, whole or what a page file has left.
            let listed = list(dir).map_err(|source| SendError::List {
                dir: dir.to_owned(),
                source,
            })?;
            if let Some((name, sent)) = sent_files
                .iter()
                .find(|(n, _)| !listed.iter().any(|(l, _)| l == *n))
            {
                return Err(SendError::Vanished {
                    name: name.clone(),
                    sent: *sent,
                }
                .into());
            }
            let left: u64 = listed
                .iter()
                .map(|(n, s)| {
                    let left = s.saturating_sub(sent_files.get(n).copied().unwrap_or(0));
                    left + left.div_ceil(CHUNK as u64) * data_head_len(n) + close_len(n)
                })
                .sum();
            self.total = Some(self.sent() + left + 1);
            for (name, size) in &listed {
                let from = sent_files.get(name).copied().unwrap_or(0);
                if *size < from {
                    return Err(SendError::Shrank { name: name.clone() }.into());
                }
                self.send_range(dir, name, from, *size).await?;
                self.write(encode_close(name, *size)).await?;
            }
            files = listed.len() as u32;
            self.write(vec![FRAME_END]).await?;
            Ok::<(), Stop>(())
        }
        .await;
        let send_ms = match written {
            Ok(()) => {
                // Dropping the writer ends the body (its last chunk).
                drop(self.opened.body.take());
                let sent = self.sent();
                (self.progress)(sent, self.total);
                dump_end.elapsed().as_secs_f64() * 1e3
            }
            // The request is over (answered early, or failed): its outcome says why.
            Err(Stop::Closed) => dump_end.elapsed().as_secs_f64() * 1e3,
            Err(Stop::Failed(e)) => {
                if let Some(body) = self.opened.body.take() {
                    body.abort(std::io::Error::other(e.to_string()));
                }
                return Err(e);
            }
        };
        let r = (&mut self.opened.answer).await??;
        Ok(Sent {
            bytes: self.sent(),
            files,
            // Set by `Streaming::finish`.
            during_dump: 0,
            send_ms,
            status: r.status,
            body: r.body.to_vec(),
        })
    }
}

/// Bytes read from a file per data frame.
const CHUNK: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            migration: "m1".into(),
            container: Ipv4Addr::new(10, 244, 1, 10),
            from: "a1".into(),
            lock: LockMode::Hold,
            argv: vec!["/bin/srv".into()],
            fail_restore: false,
            runtime: RuntimeKind::Agent,
            image: None,
            lazy: None,
        }
    }

    #[test]
    fn a_stream_fed_byte_by_byte_or_whole_writes_the_same_files() {
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let s = encode_stream(
            &header(),
            &[
                ("core-1.img", b"core"),
                ("empty.img", b""),
                ("pages-1.img", &big),
            ],
        );
        for step in [1usize, 7, 4096, s.len()] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut r = Receiver::new(dir.path(), 1 << 30);
            for c in s.chunks(step) {
                r.feed(c).expect("feed");
            }
            assert_eq!(r.finish().expect("complete"), &header());
            assert_eq!(r.files, 3);
            assert_eq!(r.bytes, s.len() as u64);
            assert_eq!(
                std::fs::read(dir.path().join("core-1.img")).expect("core"),
                b"core"
            );
            assert_eq!(
                std::fs::read(dir.path().join("empty.img")).expect("empty"),
                b""
            );
            assert_eq!(
                std::fs::read(dir.path().join("pages-1.img")).expect("pages"),
                big
            );
        }
    }

    /// A stream's bytes from frames built by hand.
    fn by_hand(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut s = encode_header(&header());
        for f in frames {
            s.extend_from_slice(f);
        }
        s
    }

    fn data(name: &str, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        encode_data_head(&mut f, name, offset, bytes.len() as u32);
        f.extend_from_slice(bytes);
        f
    }

    fn feed_all(limit: u64, s: &[u8]) -> (tempfile::TempDir, Result<(), ImageError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Receiver::new(dir.path(), limit);
        let out = r.feed(s).and_then(|()| r.finish().map(drop));
        (dir, out)
    }

    #[test]
    fn interleaved_files_are_each_written_in_order() {
        let s = by_hand(&[
            data("pages-1.img", 0, b"aaaa"),
            data("pages-2.img", 0, b"xx"),
            data("pages-1.img", 4, b"bb"),
            encode_close("pages-2.img", 2),
            encode_close("empty.img", 0),
            data("pages-1.img", 6, b"c"),
            encode_close("pages-1.img", 7),
            vec![FRAME_END],
        ]);
        for step in [1usize, 3, s.len()] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut r = Receiver::new(dir.path(), 1 << 20);
            for c in s.chunks(step) {
                r.feed(c).expect("feed");
            }
            r.finish().expect("complete");
            assert_eq!(r.files, 3);
            let read = |n: &str| std::fs::read(dir.path().join(n)).expect(n);
            assert_eq!(read("pages-1.img"), b"aaaabbc");
            assert_eq!(read("pages-2.img"), b"xx");
            assert_eq!(read("empty.img"), b"");
        }
    }

    #[test]
    fn bad_streams_are_refused() {
        let (_d, e) = feed_all(1 << 30, b"GET / HTTP/1.1\r\n");
        assert_eq!(e, Err(ImageError::Magic));

        for bad in ["../etc/passwd", "a/b", "..", "."] {
            let (_d, e) = feed_all(1 << 30, &by_hand(&[data(bad, 0, b"1")]));
            assert_eq!(e, Err(ImageError::Name(bad.into())), "{bad}");
        }
        let mut empty_name = by_hand(&[]);
        empty_name.extend([FRAME_DATA, 0, 0]);
        assert!(matches!(
            feed_all(1 << 30, &empty_name).1,
            Err(ImageError::Name(_))
        ));
        let (_d, e) = feed_all(1 << 30, &by_hand(&[vec![7]]));
        assert_eq!(e, Err(ImageError::Frame(7)));

        // Out of order, again after its close, closed at the wrong size, never closed.
        let (_d, e) = feed_all(
            1 << 30,
            &by_hand(&[data("a", 0, b"12"), data("a", 3, b"4")]),
        );
        assert_eq!(
            e,
            Err(ImageError::Offset {
                name: "a".into(),
                expected: 2,
                got: 3
            })
        );
        let (_d, e) = feed_all(
            1 << 30,
            &by_hand(&[data("a", 0, b"1"), encode_close("a", 1), data("a", 1, b"2")]),
        );
        assert_eq!(e, Err(ImageError::AfterClose("a".into())));
        let (_d, e) = feed_all(
            1 << 30,
            &by_hand(&[data("a", 0, b"1"), encode_close("a", 2)]),
        );
        assert_eq!(
            e,
            Err(ImageError::Size {
                name: "a".into(),
                size: 2,
                written: 1
            })
        );
        let (_d, e) = feed_all(1 << 30, &by_hand(&[data("a", 0, b"1"), vec![FRAME_END]]));
        assert_eq!(e, Err(ImageError::Unclosed("a".into())));
        let mut zero = by_hand(&[]);
        encode_data_head(&mut zero, "a", 0, 0);
        assert!(matches!(
            feed_all(1 << 30, &zero).1,
            Err(ImageError::FrameLength { len: 0, .. })
        ));

        // Too many files begun and not completed.
        let many: Vec<Vec<u8>> = (0..=MAX_OPEN)
            .map(|i| data(&format!("f{i}"), 0, b"1"))
            .collect();
        let (_d, e) = feed_all(1 << 30, &by_hand(&many));
        assert_eq!(e, Err(ImageError::TooManyOpen));

        let s = encode_stream(&header(), &[("pages-1.img", &[0u8; 1000])]);
        let (_d, e) = feed_all(500, &s);
        assert_eq!(e, Err(ImageError::TooLarge { limit: 500 }));

        let (_d, e) = feed_all(1 << 20, &s[..s.len() - 20]);
        assert_eq!(e, Err(ImageError::Truncated("inside a file")));
        let (_d, e) = feed_all(1 << 20, &s[..s.len() - 1]);
        assert_eq!(e, Err(ImageError::Truncated("before the end marker")));

        let mut s2 = s.clone();
        s2.push(0);
        assert_eq!(feed_all(1 << 20, &s2).1, Err(ImageError::Trailing));

        // A name already in the directory (a second stream into the same one).
        let dup = encode_stream(&header(), &[("a.img", b"1"), ("a.img", b"2")]);
        assert!(matches!(
            feed_all(1 << 20, &dup).1,
            Err(ImageError::AfterClose(_))
        ));
    }

    /// The destination's side in miniature: `POST /v1/images/{id}` fed into a [`Receiver`]
    /// writing into `dir`; `received` counts the stream's bytes as they arrive; the outcome
    /// (the header's migration, or the error) is the answer's body.
    async fn receiver(
        dir: PathBuf,
    ) -> (
        SocketAddr,
        Arc<AtomicU64>,
        Outcome,
        tokio::task::JoinHandle<()>,
    ) {
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let outcome: Outcome = Arc::default();
        let told = outcome.clone();
        let app = axum::Router::new().route(
            "/v1/images/{id}",
            axum::routing::post(move |body: axum::body::Body| async move {
                let mut r = Receiver::new(&dir, 1 << 30);
                let mut data = body.into_data_stream();
                let mut outcome = Ok(());
                while let Some(c) = data.next().await {
                    outcome = c
                        .map_err(|e| e.to_string())
                        .and_then(|c| r.feed(&c).map_err(|e| e.to_string()));
                    counter.store(r.bytes, Ordering::SeqCst);
                    if outcome.is_err() {
                        break;
                    }
                }
                let outcome = outcome.and_then(|()| {
                    r.finish()
                        .map(|h| h.migration.clone())
                        .map_err(|e| e.to_string())
                });
                *told.lock().unwrap() = Some(outcome.clone());
                match outcome {
                    Ok(m) => (axum::http::StatusCode::OK, m),
                    Err(e) => (axum::http::StatusCode::BAD_REQUEST, e),
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            axum::serve(l, app).await.expect("serve");
        });
        (addr, received, outcome, server)
    }

    /// What the miniature destination made of the stream.
    type Outcome = Arc<std::sync::Mutex<Option<Result<String, String>>>>;

    /// Until `cond` holds, within 10 s.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn quiet() -> Progress {
        Box::new(|_, _| {})
    }

    #[tokio::test]
    async fn a_page_file_crosses_the_link_while_the_dump_writes_it() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (addr, received, outcome, server) = receiver(dst.path().to_owned()).await;
        let streaming = open(addr, "", "m1").await.expect("open").stream(
            header(),
            src.path().to_owned(),
            quiet(),
        );
        // The "dump": a page file written in two halves, the second only once the first
        // reached the receiver (so it crossed before the dump was done), then the rest.
        let half: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
        let mut pages = std::fs::File::create(src.path().join("pages-1.img")).unwrap();
        pages.write_all(&half).unwrap();
        until("the first half at the receiver", || {
            received.load(Ordering::SeqCst) > half.len() as u64
        })
        .await;
        pages.write_all(&half[..1000]).unwrap();
        drop(pages);
        std::fs::write(src.path().join("core-1.img"), b"core").unwrap();
        std::fs::write(src.path().join("dump.log"), b"stays here").unwrap();
        let sent = streaming.finish().await.expect("sent");
        assert_eq!(sent.status, 200, "{}", String::from_utf8_lossy(&sent.body));
        assert_eq!(sent.body, b"m1");
        assert_eq!(sent.files, 2);
        assert!(
            sent.during_dump > half.len() as u64 && sent.during_dump < sent.bytes,
            "{} of {} bytes during the dump",
            sent.during_dump,
            sent.bytes
        );
        let mut want = half.clone();
        want.extend_from_slice(&half[..1000]);
        assert_eq!(std::fs::read(dst.path().join("pages-1.img")).unwrap(), want);
        assert_eq!(
            std::fs::read(dst.path().join("core-1.img")).unwrap(),
            b"core"
        );
        assert!(!dst.path().join("dump.log").exists());
        assert_eq!(*outcome.lock().unwrap(), Some(Ok("m1".into())));
        server.abort();
    }

    #[tokio::test]
    async fn a_stream_dropped_before_the_dump_is_done_is_refused_by_the_destination() {
        let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (addr, received, outcome, server) = receiver(dst.path().to_owned()).await;
        let opened = open(addr, "", "m1").await.expect("open");
        std::fs::write(src.path().join("pages-1.img"), vec![1u8; 4096]).unwrap();
        let streaming = opened.stream(header(), src.path().to_owned(), quiet());
        std::fs::write(src.path().join("pages-2.img"), vec![2u8; 4096]).unwrap();
        until("a page file at the receiver", || {
            received.load(Ordering::SeqCst) > 4096
        })
        .await;
        // The dump failed: the checkpoint drops the stream.
        drop(streaming);
        // The receiver saw the body cut before its end frame: an incomplete stream.
        until("the receiver's outcome", || {
            outcome.lock().unwrap().is_some()
        })
        .await;
        let got = outcome.lock().unwrap().clone();
        assert!(matches!(got, Some(Err(_))), "{got:?}");
        server.abort();
    }

    #[test]
    fn list_skips_logs_and_sorts() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (n, b) in [("b.img", "bb"), ("a.img", "a"), ("dump.log", "log")] {
            std::fs::write(dir.path().join(n), b).expect("write");
        }
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        assert_eq!(
            list(dir.path()).expect("list"),
            vec![("a.img".to_owned(), 1), ("b.img".to_owned(), 2)]
        );
    }
}
