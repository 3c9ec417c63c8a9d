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
    io,
    mem::{self, size_of},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    ptr,
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
    pub fds: Vec<OwnedFd>,
    pub payload: Vec<u8>,
}

/// The counts a header announces: (`fds`, `state_len`), 0 when absent.
pub fn counts(header: &Value) -> Result<(usize, usize), String> {
    let field = |name: &str| -> Result<usize, String> {
        match header.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("`{name}` must be a non-negative integer, not {v}")),
        }
    };
    if !header.is_object() {
        return Err(format!("the header must be a JSON object, not {header}"));
    }
    Ok((field("fds")?, field("state_len")?))
}

/// Sends one message: header, descriptors, payload.
pub fn send_message(
    sock: &UnixStream,
    header: &Value,
    fds: &[BorrowedFd<'_>],
    payload: &[u8],
) -> io::Result<()> {
    let head = serde_json::to_vec(header).map_err(io::Error::other)?;
    if head.len() > MAX_HEADER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("header of {} bytes (at most {MAX_HEADER_LEN})", head.len()),
        ));
    }
    let mut first = Vec::with_capacity(4 + head.len());
    first.extend_from_slice(&(head.len() as u32).to_be_bytes());
    first.extend_from_slice(&head);
    write_all(sock, &first, &[])?;
    for chunk in fds.chunks(MAX_FDS_PER_CARRIER) {
        write_all(sock, &[0], chunk)?;
    }
    write_all(sock, payload, &[])
}

/// Receives one message; refuses a payload longer than `max_payload`.
pub fn recv_message(sock: &UnixStream, max_payload: usize) -> io::Result<Message> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact(sock, &mut len, &mut fds)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header of {len} bytes (at most {MAX_HEADER_LEN})"
        )));
    }
    let mut head = vec![0u8; len];
    read_exact(sock, &mut head, &mut fds)?;
    let header: Value =
        serde_json::from_slice(&head).map_err(|e| bad(format!("the header is not JSON: {e}")))?;
    let (nfds, state_len) = counts(&header).map_err(bad)?;
    if state_len > max_payload {
        return Err(bad(format!(
            "state_len {state_len} is more than {max_payload}"
        )));
    }
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

fn write_all(sock: &UnixStream, mut bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut fds = fds;
    while !bytes.is_empty() {
        let n = send_with_fds(sock.as_fd(), bytes, fds)?;
        fds = &[];
        bytes = &bytes[n..];
    }
    Ok(())
}

fn read_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = recv_with_fds(sock.as_fd(), &mut buf[off..], fds)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed {off} bytes into a {}-byte read",
                    buf.len()
                ),
            ));
        }
        off += n;
    }
    Ok(())
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

/// One `sendmsg`: `bytes` (some of them), with `fds` (at most 253) as `SCM_RIGHTS`.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_CARRIER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one sendmsg (at most 253)", fds.len()),
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let space = cmsg_space(raw.len());
    // u64 elements: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(n fds) bytes, so CMSG_FIRSTHDR is non-null
        // and the header plus n descriptors (CMSG_LEN) fit behind it; the copy reads `raw`'s
        // n descriptors.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((raw.len() * size_of::<RawFd>()) as u32) as _;
            ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                raw.len() * size_of::<RawFd>(),
            );
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (over `bytes`) and `control`, both alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recvmsg` into `buf`; descriptors that arrive (close-on-exec) are appended to `fds`.
/// A message with more descriptors than one carrier may hold is an error (the kernel closed
/// the excess).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let space = cmsg_space(MAX_FDS_PER_CARRIER);
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both alive and writable.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the kernel filled `control` with msg_controllen bytes of well-formed cmsg
    // headers; CMSG_FIRSTHDR/CMSG_NXTHDR walk them within that length, and an SCM_RIGHTS
    // payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors that are now ours to own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more than 253 descriptors arrived with one carrier byte (the excess was closed)",
        ));
    }
    Ok(n)
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
        assert!(e.to_string().contains("not JSON"), "{e}");
    }
}
