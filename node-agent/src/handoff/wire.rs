//! The hand-off wire format, agent side (async over tokio's `UnixStream`). The format is
//! described in `ferry_workload::wire` (the client side, blocking) and in the module docs of
//! [`crate::handoff`]; the two are tested against each other.
//!
//! `u32 big-endian L | L bytes JSON header | ⌈fds/253⌉ carrier bytes (SCM_RIGHTS) |
//! state_len bytes payload`.

use std::{
    io,
    mem::{self, size_of},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    ptr,
};

use serde_json::Value;
use tokio::{io::Interest, net::UnixStream};

/// Descriptors per carrier byte (the kernel's `SCM_MAX_FD`).
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

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer broke the format (answerable with `bad_request`).
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The counts a header announces: (`fds`, `state_len`), 0 when absent.
pub fn counts(header: &Value) -> Result<(usize, usize), String> {
    if !header.is_object() {
        return Err(format!("the header must be a JSON object, not {header}"));
    }
    let field = |name: &str| -> Result<usize, String> {
        match header.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("`{name}` must be a non-negative integer, not {v}")),
        }
    };
    Ok((field("fds")?, field("state_len")?))
}

/// Reads one message; a payload longer than `max_payload` is refused before it is read.
pub async fn recv(stream: &UnixStream, max_payload: usize) -> Result<Message, WireError> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact(stream, &mut len, &mut fds).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER_LEN {
        return Err(WireError::Malformed(format!(
            "a header of {len} bytes (at most {MAX_HEADER_LEN}; the message starts with its \
             length as a big-endian u32)"
        )));
    }
    let mut head = vec![0u8; len];
    read_exact(stream, &mut head, &mut fds).await?;
    let header: Value = serde_json::from_slice(&head)
        .map_err(|e| WireError::Malformed(format!("the header is not JSON: {e}")))?;
    let (nfds, state_len) = counts(&header).map_err(WireError::Malformed)?;
    if state_len > max_payload {
        return Err(WireError::Malformed(format!(
            "state_len {state_len} is more than the {max_payload} bytes accepted"
        )));
    }
    for _ in 0..nfds.div_ceil(MAX_FDS_PER_CARRIER) {
        read_exact(stream, &mut [0u8; 1], &mut fds).await?;
    }
    let mut payload = vec![0u8; state_len];
    read_exact(stream, &mut payload, &mut fds).await?;
    Ok(Message {
        header,
        fds,
        payload,
    })
}

/// Writes one message. `header` must announce `fds` = `fds.len()` and `state_len` =
/// `payload.len()`.
pub async fn send(
    stream: &UnixStream,
    header: &Value,
    fds: &[BorrowedFd<'_>],
    payload: &[u8],
) -> io::Result<()> {
    let head = serde_json::to_vec(header).map_err(io::Error::other)?;
    let mut first = Vec::with_capacity(4 + head.len());
    first.extend_from_slice(&(head.len() as u32).to_be_bytes());
    first.extend_from_slice(&head);
    write_all(stream, &first, &[]).await?;
    for chunk in fds.chunks(MAX_FDS_PER_CARRIER) {
        write_all(stream, &[0], chunk).await?;
    }
    write_all(stream, payload, &[]).await
}

async fn read_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<(), WireError> {
    let mut off = 0;
    while off < buf.len() {
        let n = stream
            .async_io(Interest::READABLE, || {
                recv_with_fds(stream.as_fd(), &mut buf[off..], fds)
            })
            .await?;
        if n == 0 {
            return Err(WireError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the connection closed {off} bytes into a {}-byte read",
                    buf.len()
                ),
            )));
        }
        off += n;
    }
    Ok(())
}

async fn write_all(
    stream: &UnixStream,
    mut bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut fds = fds;
    while !bytes.is_empty() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                send_with_fds(stream.as_fd(), bytes, fds)
            })
            .await?;
        fds = &[];
        bytes = &bytes[n..];
    }
    Ok(())
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

/// One non-blocking `sendmsg` of (some of) `bytes`, with `fds` (≤ 253) as SCM_RIGHTS.
fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_CARRIER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 253 descriptors in one sendmsg",
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
    // SAFETY: `msg` points at `iov` (over `bytes`) and `control`, both alive for the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking `recvmsg` into `buf`; arriving descriptors (close-on-exec) are appended to
/// `fds`. More descriptors than one carrier may hold is an error (the kernel closed the excess).
fn recv_with_fds(
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
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both alive and writable.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
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
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::MetadataExt as _;

    fn ino(fd: BorrowedFd<'_>) -> u64 {
        std::fs::File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .unwrap()
            .ino()
    }

    /// The workload's blocking client and this async side agree on the format, both ways,
    /// with more descriptors than one carrier holds.
    #[tokio::test]
    async fn interoperates_with_the_workload_client() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let b = UnixStream::from_std(b).unwrap();
        let pipes: Vec<_> = (0..260).map(|_| std::io::pipe().unwrap()).collect();
        let inos: Vec<u64> = pipes.iter().map(|(r, _)| ino(r.as_fd())).collect();
        let owned: Vec<OwnedFd> = pipes.into_iter().map(|(r, _)| r.into()).collect();
        let client = std::thread::spawn(move || {
            let fds: Vec<BorrowedFd<'_>> = owned.iter().map(AsFd::as_fd).collect();
            let h = json!({"op": "export", "fds": fds.len(), "state_len": 3});
            ferry_workload::wire::send_message(&a, &h, &fds, b"abc").unwrap();
            ferry_workload::wire::recv_message(&a, 100).unwrap()
        });
        let m = recv(&b, 100).await.unwrap();
        assert_eq!(m.payload, b"abc");
        assert_eq!(
            m.fds.iter().map(|f| ino(f.as_fd())).collect::<Vec<_>>(),
            inos
        );
        let back: Vec<BorrowedFd<'_>> = m.fds.iter().map(AsFd::as_fd).collect();
        let h = json!({"ok": true, "fds": back.len(), "state_len": 2});
        send(&b, &h, &back, b"ok").await.unwrap();
        let reply = client.join().unwrap();
        assert_eq!(reply.payload, b"ok");
        assert_eq!(
            reply.fds.iter().map(|f| ino(f.as_fd())).collect::<Vec<_>>(),
            inos
        );
    }

    #[tokio::test]
    async fn malformed_headers_are_named() {
        let (a, b) = UnixStream::pair().unwrap();
        use tokio::io::AsyncWriteExt as _;
        let mut a = a;
        a.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        let e = recv(&b, 10).await.unwrap_err().to_string();
        assert!(e.contains("header of 1048576 bytes"), "{e}");
        let (mut a, b) = UnixStream::pair().unwrap();
        let h = br#"{"op":"export","state_len":11}"#;
        a.write_all(&(h.len() as u32).to_be_bytes()).await.unwrap();
        a.write_all(h).await.unwrap();
        let e = recv(&b, 10).await.unwrap_err().to_string();
        assert!(e.contains("state_len 11"), "{e}");
        assert!(counts(&json!({"fds": "2"})).is_err());
    }
}
