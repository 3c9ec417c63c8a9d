//! The hand-off wire format, agent side (async over tokio's `UnixStream`). The format is
//! described in `ferry_workload::wire` (the client side, blocking), whose framing and
//! SCM_RIGHTS primitives this reuses, and in the module docs of [`crate::handoff`]; the two
//! are tested against each other.
//!
//! `u32 big-endian L | L bytes JSON header | ⌈fds/253⌉ carrier bytes (SCM_RIGHTS) |
//! state_len bytes payload`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub use ferry_workload::wire::{
    HeaderError, MAX_FDS_PER_CARRIER, MAX_HEADER_LEN, Message, WireError, counts,
};
use ferry_workload::wire::{
    decode_header, encode_header, header_len, recv_with_fds, send_with_fds,
};
use serde_json::Value;
use tokio::{io::Interest, net::UnixStream};

/// Reads one message; a payload longer than `max_payload` is refused before it is read.
pub async fn recv(stream: &UnixStream, max_payload: usize) -> Result<Message, WireError> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact(stream, &mut len, &mut fds).await?;
    let mut head = vec![0u8; header_len(len)?];
    read_exact(stream, &mut head, &mut fds).await?;
    let (header, nfds, state_len) = decode_header(&head, max_payload)?;
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
) -> Result<(), WireError> {
    write_all(stream, &encode_header(header)?, &[]).await?;
    for chunk in fds.chunks(MAX_FDS_PER_CARRIER) {
        write_all(stream, &[0], chunk).await?;
    }
    write_all(stream, payload, &[]).await
}

/// A wire error as tokio's readiness loop needs it (`WouldBlock` retried), and back.
fn into_io(e: WireError) -> std::io::Error {
    match e {
        WireError::Io(e) => e,
        e => std::io::Error::other(e),
    }
}

fn from_io(e: std::io::Error) -> WireError {
    e.downcast::<WireError>().unwrap_or_else(WireError::Io)
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
                recv_with_fds(stream.as_fd(), &mut buf[off..], fds).map_err(into_io)
            })
            .await
            .map_err(from_io)?;
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

async fn write_all(
    stream: &UnixStream,
    mut bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    let mut fds = fds;
    while !bytes.is_empty() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                send_with_fds(stream.as_fd(), bytes, fds).map_err(into_io)
            })
            .await
            .map_err(from_io)?;
        fds = &[];
        bytes = &bytes[n..];
    }
    Ok(())
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
