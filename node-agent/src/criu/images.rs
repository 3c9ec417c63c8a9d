//! The image stream between agents: the source sends a dump directory to the destination's
//! `POST /v1/images/{migration}` as one HTTP body, file after file, read from disk and
//! written to disk as it goes (no directory is shared between hosts).
//!
//! ```text
//! "FERRYIMG1\n" | u32 BE L | L bytes JSON Header
//! then per file: u16 BE n (1..=255) | n bytes name | u64 BE size | size bytes
//! then u16 0 (end)
//! ```
//!
//! Names are plain file names (no `/`, not `.` or `..`); a stream with anything else, more
//! than [`MAX_FILES`] files, or more than the receiver's byte limit is refused and what was
//! written is removed by the caller.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Instant,
};

use ferry_api::{
    run::{LockMode, RuntimeKind},
    transport::{BodyClosed, BodyWriter, HttpError, Request, Response},
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;
use tracing::Instrument as _;

pub const MAGIC: &[u8] = b"FERRYIMG1\n";
pub const MAX_FILES: u32 = 100_000;
const MAX_HEADER: u32 = 64 * 1024;

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

enum State {
    Magic,
    HeaderLen,
    Header(usize),
    NameLen,
    Name(usize),
    Size(String),
    Body { remaining: u64 },
    Done,
}

/// A push parser that writes the files into `dir` as the bytes arrive.
pub struct Receiver {
    dir: PathBuf,
    limit: u64,
    state: State,
    buf: Vec<u8>,
    file: Option<(std::fs::File, String)>,
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
            file: None,
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
                        self.state = State::NameLen;
                    }
                    None => self.state = State::Header(n),
                },
                State::NameLen => match self.take(&mut data, 2) {
                    Some(b) => {
                        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
                        self.state = if n == 0 { State::Done } else { State::Name(n) };
                        if n == 0 && !data.is_empty() {
                            return Err(ImageError::Trailing);
                        }
                        if n == 0 {
                            return Ok(());
                        }
                    }
                    None => self.state = State::NameLen,
                },
                State::Name(n) => match self.take(&mut data, n) {
                    Some(b) => {
                        let name = String::from_utf8(b)
                            .map_err(|e| ImageError::Name(format!("{:?}", e.as_bytes())))?;
                        if !valid_name(&name) {
                            return Err(ImageError::Name(name));
                        }
                        self.files += 1;
                        if self.files > MAX_FILES {
                            return Err(ImageError::TooManyFiles);
                        }
                        self.state = State::Size(name);
                    }
                    None => self.state = State::Name(n),
                },
                State::Size(name) => match self.take(&mut data, 8) {
                    Some(b) => {
                        let size = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                        if size > self.limit {
                            return Err(ImageError::TooLarge { limit: self.limit });
                        }
                        let path = self.dir.join(&name);
                        let f = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path)
                            .map_err(|e| ImageError::Io {
                                path: path.display().to_string(),
                                error: e.to_string(),
                            })?;
                        self.file = Some((f, name));
                        self.state = if size == 0 {
                            self.file = None;
                            State::NameLen
                        } else {
                            State::Body { remaining: size }
                        };
                    }
                    None => self.state = State::Size(name),
                },
                State::Body { remaining } => {
                    let n = (remaining.min(data.len() as u64)) as usize;
                    let (f, name) = self.file.as_mut().expect("a file is open in Body");
                    f.write_all(&data[..n]).map_err(|e| ImageError::Io {
                        path: name.clone(),
                        error: e.to_string(),
                    })?;
                    data = &data[n..];
                    let left = remaining - n as u64;
                    if left == 0 {
                        self.file = None;
                        self.state = State::NameLen;
                    } else {
                        self.state = State::Body { remaining: left };
                    }
                }
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
            State::Body { .. } => Err(ImageError::Truncated("inside a file")),
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

/// Encodes the fixed parts around the file bodies: magic, header length, header.
fn encode_header(h: &Header) -> Vec<u8> {
    let json = serde_json::to_vec(h).expect("a header encodes");
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Encodes what precedes a file's bytes: name length, name, size.
fn encode_file_head(name: &str, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len() + 8);
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out
}

/// A whole stream in memory: `files` (name, bytes) in the given order. For tests and tools;
/// [`send`] streams from disk instead.
pub fn encode_stream(h: &Header, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = encode_header(h);
    for (n, b) in files {
        out.extend(encode_file_head(n, b.len() as u64));
        out.extend_from_slice(b);
    }
    out.extend_from_slice(&0u16.to_be_bytes());
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
    #[error("sending the images: {0}")]
    Http(#[from] ferry_api::transport::HttpError),
    #[error("the image request's task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What a send achieved.
pub struct Sent {
    pub bytes: u64,
    pub files: u32,
    /// Until the last byte was handed to the connection (at most two 256 KiB frames queued).
    pub send_ms: f64,
    pub status: u16,
    pub body: Vec<u8>,
}

/// An image stream's request, opened before the dump: the TCP connection, its TLS handshake
/// and the request's head cross the link while the source drains and dumps, so the frozen
/// container does not wait for them (across a WAN they are two to three round trips). The
/// body (length unknown until the dump is done: chunked) is written by [`Opened::send`].
/// Dropped unsent (the dump failed, the run ended early), the body is aborted: the
/// destination sees an incomplete stream and restores nothing.
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

impl Opened {
    /// Streams `dir` (after `header`) and waits for the destination's answer (it answers once
    /// it restored). `progress(sent, total)` is called every 4 MiB and at the end.
    pub async fn send(
        mut self,
        header: &Header,
        dir: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Sent, SendError> {
        let mut body = self.body.take().expect("an opened stream is sent once");
        let files = match list(dir) {
            Ok(f) => f,
            Err(source) => {
                body.abort(std::io::Error::other("the images could not be listed"));
                return Err(SendError::List {
                    dir: dir.to_owned(),
                    source,
                });
            }
        };
        let head = encode_header(header);
        let total: u64 = head.len() as u64
            + files
                .iter()
                .map(|(n, s)| 2 + n.len() as u64 + 8 + s)
                .sum::<u64>()
            + 2;
        let t = Instant::now();
        let mut sent = 0u64;
        let written = write_files(
            &mut body,
            head,
            &files,
            dir,
            &mut sent,
            total,
            &mut progress,
        )
        .await;
        let send_ms = match written {
            Ok(()) => {
                // Dropping the writer ends the body (its last chunk).
                drop(body);
                progress(sent, total);
                t.elapsed().as_secs_f64() * 1e3
            }
            // The request is over (answered early, or failed): its outcome says why.
            Err(Stop::Closed) => t.elapsed().as_secs_f64() * 1e3,
            Err(Stop::Failed(e)) => {
                body.abort(std::io::Error::other(e.to_string()));
                return Err(e);
            }
        };
        let r = (&mut self.answer).await??;
        Ok(Sent {
            bytes: sent,
            files: files.len() as u32,
            send_ms,
            status: r.status,
            body: r.body.to_vec(),
        })
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

/// Writes the stream after `head`: every file, then the end marker.
async fn write_files(
    body: &mut BodyWriter,
    head: Vec<u8>,
    files: &[(String, u64)],
    dir: &Path,
    sent: &mut u64,
    total: u64,
    progress: &mut impl FnMut(u64, u64),
) -> Result<(), Stop> {
    *sent += head.len() as u64;
    body.write(head).await?;
    let mut next_report = 4 << 20;
    for (name, size) in files {
        body.write(encode_file_head(name, *size)).await?;
        *sent += 2 + name.len() as u64 + 8;
        let mut f = tokio::fs::File::open(dir.join(name))
            .await
            .map_err(|source| {
                Stop::Failed(SendError::Open {
                    name: name.clone(),
                    source,
                })
            })?;
        let mut left = *size;
        while left > 0 {
            let mut buf = vec![0u8; CHUNK.min(left as usize)];
            let n = f.read(&mut buf).await.map_err(|source| {
                Stop::Failed(SendError::Read {
                    name: name.clone(),
                    source,
                })
            })?;
            if n == 0 {
                return Err(Stop::Failed(SendError::Shrank { name: name.clone() }));
            }
            buf.truncate(n);
            body.write(buf).await?;
            left -= n as u64;
            *sent += n as u64;
            if *sent >= next_report {
                progress(*sent, total);
                next_report += 4 << 20;
            }
        }
    }
    body.write(0u16.to_be_bytes().to_vec()).await?;
    *sent += 2;
    Ok(())
}

/// Bytes read from a file per body frame.
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

    #[test]
    fn bad_streams_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Receiver::new(dir.path(), 1 << 30);
        assert_eq!(r.feed(b"GET / HTTP/1.1\r\n"), Err(ImageError::Magic));

        for bad in ["../etc/passwd", "a/b", "..", ".", ""] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut r = Receiver::new(dir.path(), 1 << 30);
            let mut s = encode_header(&header());
            s.extend((bad.len() as u16).to_be_bytes());
            s.extend(bad.as_bytes());
            s.extend(1u64.to_be_bytes());
            let e = r.feed(&s).expect_err(bad);
            if bad.is_empty() {
                // A zero-length name is the end marker: then bytes follow it.
                assert_eq!(e, ImageError::Trailing);
            } else {
                assert_eq!(e, ImageError::Name(bad.into()));
            }
        }

        let s = encode_stream(&header(), &[("pages-1.img", &[0u8; 1000])]);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Receiver::new(dir.path(), 500);
        assert_eq!(r.feed(&s), Err(ImageError::TooLarge { limit: 500 }));

        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Receiver::new(dir.path(), 1 << 20);
        r.feed(&s[..s.len() - 10]).expect("a prefix is fine");
        assert_eq!(r.finish(), Err(ImageError::Truncated("inside a file")));

        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Receiver::new(dir.path(), 1 << 20);
        let mut s2 = s.clone();
        s2.push(0);
        assert_eq!(r.feed(&s2), Err(ImageError::Trailing));

        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Receiver::new(dir.path(), 1 << 20);
        let dup = encode_stream(&header(), &[("a.img", b"1"), ("a.img", b"2")]);
        assert!(matches!(r.feed(&dup), Err(ImageError::Io { .. })));
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
