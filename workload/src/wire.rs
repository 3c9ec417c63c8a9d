//! The hand-off wire format, client side (blocking). The agent's side is
//! `ferry_agent::handoff::wire`; both follow this description.
//!
//! One message, in either direction, on a Unix stream socket:
//!
//! ```text
//! u32 big-endian L | L bytes: JSON header | ⌈fds / 253⌉ carrier bytes | state_len bytes: payload
//! ```
//!
//! - The header is a JSON object. Its `fds` field (absent: 0) is the number of file
//!   descriptors the message carries, its `state_len` field (absent: 0) the payload's length.
//! - The descriptors travel as `SCM_RIGHTS` on the carrier bytes (each a 0 byte), at most 253
//!   per carrier (the kernel's limit per message), in order: the first 253 on the first
//!   carrier, and so on. A receiver counts every descriptor that arrives while it reads the
//!   message and compares the total with `fds`.
//! - Each side reads exactly the lengths the header announces, never further, so descriptors
//!   can never be attached to bytes of the next message.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde_json::Value;

/// Descriptors per carrier byte (`SCM_MAX_FD` is 253).
pub const MAX_FDS_PER_CARRIER: usize = 253;
/// Longest header accepted.
pub const MAX_HEADER_LEN: usize = 64 * 1024;

/// One message.
#[derive(Debug)]
pub struct Message {
    pub header: Value,
    /// Every descriptor that arrived while the message was read, in order.
    pub fds: Vec<OwnedFd>,
    pub payload: Vec<u8>,
}

/// A header that does not announce its counts properly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the header must be a JSON object, not {0}")]
    NotAnObject(String),
    #[error("`{field}` must be a non-negative integer, not {value}")]
    NotACount { field: &'static str, value: String },
}

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(
        "a header of {0} bytes (at most {MAX_HEADER_LEN}; the message starts with its length as \
         a big-endian u32)"
    )]
    HeaderTooLong(usize),
    #[error("the header is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("state_len {len} is more than the {max} bytes accepted")]
    PayloadTooLong { len: usize, max: usize },
    #[error("{0} descriptors in one sendmsg (at most {MAX_FDS_PER_CARRIER})")]
    TooManyFds(usize),
    #[error(
        "more than {MAX_FDS_PER_CARRIER} descriptors arrived with one carrier byte (the excess \
         was closed)"
    )]
    FdsTruncated,
    #[error("the connection closed {got} bytes into a {want}-byte read")]
    Eof { got: usize, want: usize },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<rustix::io::Errno> for WireError {
    fn from(e: rustix::io::Errno) -> Self {
        Self::Io(e.into())
    }
}

impl WireError {
    /// The peer broke the format (as opposed to an I/O failure).
    pub fn is_malformed(&self) -> bool {
        !matches!(self, Self::Io(_) | Self::Eof { .. })
    }
}

/// The counts a header announces: (`fds`, `state_len`), 0 when absent.
pub fn counts(header: &Value) -> Result<(usize, usize), HeaderError> {
    if !header.is_object() {
        return Err(HeaderError::NotAnObject(header.to_string()));
    }
    let field = |field: &'static str| -> Result<usize, HeaderError> {
        match header.get(field) {
            None | Some(Value::Null) => Ok(0),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| HeaderError::NotACount {
                    field,
                    value: v.to_string(),
                }),
        }
    };
    Ok((field("fds")?, field("state_len")?))
}

/// The first part of a message: the header's length and the header.
pub fn encode_header(header: &Value) -> Result<Vec<u8>, WireError> {
    let head = serde_json::to_vec(header).map_err(WireError::NotJson)?;
    if head.len() > MAX_HEADER_LEN {
        return Err(WireError::HeaderTooLong(head.len()));
    }
    let mut first = Vec::with_capacity(4 + head.len());
    first.extend_from_slice(&(head.len() as u32).to_be_bytes());
    first.extend_from_slice(&head);
    Ok(first)
}

/// The header's length from the first four bytes of a message.
pub fn header_len(len: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER_LEN {
        return Err(WireError::HeaderTooLong(len));
    }
    Ok(len)
}

/// Parses a header; returns it with its counts (`fds`, `state_len`), the payload's length
/// checked against `max_payload`.
pub fn decode_header(head: &[u8], max_payload: usize) -> Result<(Value, usize, usize), WireError> {
    let header: Value = serde_json::from_slice(head).map_err(WireError::NotJson)?;
    let (nfds, state_len) = counts(&header)?;
    if state_len > max_payload {
        return Err(WireError::PayloadTooLong {
            len: state_len,
            max: max_payload,
        });
    }
    Ok((header, nfds, state_len))
}

/// Sends one message: header, descriptors, payload.
pub fn send_message(
    sock: &UnixStream,
    header: &Value,
    fds: &[BorrowedFd<'_>],
    payload: &[u8],
) -> Result<(), WireError> {
    write_all(sock, &encode_header(header)?, &[])?;
    for chunk in fds.chunks(MAX_FDS_PER_CARRIER) {
        write_all(sock, &[0], chunk)?;
    }
    write_all(sock, payload, &[])
}

/// Receives one message; refuses a payload longer than `max_payload`.
pub fn recv_message(sock: &UnixStream, max_payload: usize) -> Result<Message, WireError> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact(sock, &mut len, &mut fds)?;
    let mut head = vec![0u8; header_len(len)?];
    read_exact(sock, &mut head, &mut fds)?;
    let (header, nfds, state_len) = decode_header(&head, max_payload)?;
    for _ in 0..nfds.div_ceil(MAX_FDS_PER_CARRIER) {
        read_exact(sock, &mut [0u8; 1], &mut fds)?;
    }
    let mut payload = vec![0u8; state_len];
    read_exact(sock, &mut payload, &mut fds)?;
    Ok(Message {
        header,
        fds,
        payload,
    })
}

fn write_all(sock: &UnixStream, mut bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    let mut fds = fds;
    while !bytes.is_empty() {
        let n = send_with_fds(sock.as_fd(), bytes, fds)?;
        fds = &[];
        bytes = &bytes[n..];
    }
    Ok(())
}

fn read_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), WireError> {
    let mut off = 0;
    while off < buf.len() {
        let n = recv_with_fds(sock.as_fd(), &mut buf[off..], fds)?;
        if n == 0 {
            return Err(WireError::Eof {
                got: off,
                want: buf.len(),
            });
        }
        off += n;
    }
    Ok(())
}

/// One `sendmsg`: `bytes` (some of them), with `fds` (at most 253) as `SCM_RIGHTS`. On a
/// non-blocking socket it fails with `WouldBlock` rather than wait.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, WireError> {
    if fds.len() > MAX_FDS_PER_CARRIER {
        return Err(WireError::TooManyFds(fds.len()));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_CARRIER))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        // Cannot fail: the buffer has room for MAX_FDS_PER_CARRIER descriptors.
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    let iov = [IoSlice::new(bytes)];
    loop {
        match rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Err(rustix::io::Errno::INTR) => continue,
            sent => return Ok(sent?),
        }
    }
}

/// One `recvmsg` into `buf`; descriptors that arrive (close-on-exec) are appended to `fds`.
/// A message with more descriptors than one carrier may hold is an error (the kernel closed
/// the excess). On a non-blocking socket it fails with `WouldBlock` rather than wait.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, WireError> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_CARRIER))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let got = loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            got => break got?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(arrived) = m {
            fds.extend(arrived);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(WireError::FdsTruncated);
    }
    Ok(got.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_with_many_descriptors_round_trips_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        // 300 descriptors: two carriers. Each is a distinct pipe, told apart by inode.
        let pipes: Vec<(std::io::PipeReader, std::io::PipeWriter)> =
            (0..300).map(|_| std::io::pipe().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
        let header = json!({"op": "test", "fds": fds.len(), "state_len": 5});
        let sender = {
            let fds: Vec<OwnedFd> = fds
                .iter()
                .map(|f| f.try_clone_to_owned().unwrap())
                .collect();
            std::thread::spawn(move || {
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                send_message(&a, &header, &borrowed, b"hello").unwrap();
            })
        };
        let m = recv_message(&b, 1024).unwrap();
        sender.join().unwrap();
        assert_eq!(m.payload, b"hello");
        assert_eq!(m.fds.len(), 300);
        let ino = |fd: BorrowedFd<'_>| {
            let f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
            std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap())
        };
        for (sent, got) in fds.iter().zip(&m.fds) {
            assert_eq!(ino(*sent), ino(got.as_fd()));
        }
        assert_eq!(counts(&m.header).unwrap(), (300, 5));
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(counts(&json!([1])).is_err());
        assert!(counts(&json!({"fds": -1})).is_err());
        assert_eq!(counts(&json!({"op": "claim"})).unwrap(), (0, 0));
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write as _;
        (&a).write_all(&3u32.to_be_bytes()).unwrap();
        (&a).write_all(b"{x}").unwrap();
        let e = recv_message(&b, 10).unwrap_err();
        assert!(e.is_malformed());
        assert!(e.to_string().contains("not JSON"), "{e}");
    }
}
