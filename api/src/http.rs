//! The little HTTP/1.1 the client needs: encoding one request, and recognising one complete
//! response in a growing buffer. Pure functions over bytes, so the parsing is unit-tested
//! without a network.

use std::fmt::Write as _;

/// Longest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why bytes are not an acceptable HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed HTTP status line {0:?}")]
    StatusLine(String),
    #[error("malformed HTTP header line {0:?}")]
    Header(String),
    #[error("HTTP response head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("HTTP response body larger than the {limit}-byte limit")]
    BodyTooLarge { limit: usize },
    #[error("invalid Content-Length {0:?}")]
    ContentLength(String),
    #[error("malformed chunked encoding: {0}")]
    Chunked(String),
    #[error("connection closed before the response was complete ({got} bytes received)")]
    Truncated { got: usize },
}

/// Encodes a request. `Connection: close`: one request per connection. A body is sent as JSON
/// with its Content-Length.
pub fn encode_request(
    method: &str,
    path: &str,
    host: &str,
    token: Option<&str>,
    json_body: Option<&[u8]>,
) -> Vec<u8> {
    let mut head = String::with_capacity(256);
    // Writing to a String cannot fail.
    let _ = write!(
        head,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ferry/{}\r\n\
         Accept: application/json\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        let _ = write!(head, "Authorization: Bearer {t}\r\n");
    }
    match json_body {
        Some(b) => {
            let _ = write!(
                head,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            );
        }
        None if matches!(method, "POST" | "PUT" | "PATCH") => {
            head.push_str("Content-Length: 0\r\n")
        }
        None => {}
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(b) = json_body {
        out.extend_from_slice(b);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Tries to read one complete response from the start of `buf`.
///
/// `Ok(None)`: incomplete, read more (`eof` false). With `eof` true, an incomplete response is
/// an error, except a body framed by the end of the connection. 1xx interim responses are
/// skipped. `max_body` bounds the body (decoded size for chunked).
pub fn parse_response(
    buf: &[u8],
    eof: bool,
    max_body: usize,
) -> Result<Option<Response>, ParseError> {
    let incomplete = |got: usize| {
        if eof {
            Err(ParseError::Truncated { got })
        } else {
            Ok(None)
        }
    };
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(ParseError::HeadTooLarge);
        }
        return incomplete(buf.len());
    };
    if head_end > MAX_HEAD {
        return Err(ParseError::HeadTooLarge);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(ParseError::StatusLine(status_line.into()));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(ParseError::StatusLine(status_line.into()));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| ParseError::StatusLine(status_line.into()))?;
    if !(100..=599).contains(&status) {
        return Err(ParseError::StatusLine(status_line.into()));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError::Header(line.into()));
        };
        if name.is_empty() || name.contains(' ') {
            return Err(ParseError::Header(line.into()));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let rest = &buf[head_end + 4..];
    if (100..200).contains(&status) {
        // Interim response (e.g. 100 Continue): the real one follows.
        return parse_response(rest, eof, max_body);
    }
    let header = |n: &str| {
        headers
            .iter()
            .find(|(h, _)| h == n)
            .map(|(_, v)| v.as_str())
    };
    let body = if status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
    {
        match decode_chunked(rest, max_body)? {
            Some(b) => b,
            None => return incomplete(buf.len()),
        }
    } else if let Some(cl) = header("content-length") {
        let len: usize = cl
            .parse()
            .map_err(|_| ParseError::ContentLength(cl.into()))?;
        if len > max_body {
            return Err(ParseError::BodyTooLarge { limit: max_body });
        }
        if rest.len() < len {
            return incomplete(buf.len());
        }
        rest[..len].to_vec()
    } else {
        // Framed by the end of the connection.
        if rest.len() > max_body {
            return Err(ParseError::BodyTooLarge { limit: max_body });
        }
        if !eof {
            return Ok(None);
        }
        rest.to_vec()
    };
    Ok(Some(Response {
        status,
        headers,
        body,
    }))
}

/// Decodes a chunked body; `Ok(None)` if incomplete.
fn decode_chunked(mut buf: &[u8], max_body: usize) -> Result<Option<Vec<u8>>, ParseError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(buf, b"\r\n") else {
            if buf.len() > 1024 {
                return Err(ParseError::Chunked("chunk size line too long".into()));
            }
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&buf[..line_end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ParseError::Chunked(format!("invalid chunk size {size_text:?}")))?;
        buf = &buf[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = find(buf, b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                buf = &buf[end + 2..];
            }
        }
        if body.len().saturating_add(size) > max_body {
            return Err(ParseError::BodyTooLarge { limit: max_body });
        }
        if buf.len() < size + 2 {
            return Ok(None);
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err(ParseError::Chunked(
                "chunk data not followed by CRLF".into(),
            ));
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn encodes_requests() {
        let r = encode_request(
            "POST",
            "/v1/hosts",
            "127.0.0.1:7400",
            Some("s3cret"),
            Some(b"{}"),
        );
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("POST /v1/hosts HTTP/1.1\r\nHost: 127.0.0.1:7400\r\n"));
        assert!(text.contains("\r\nAuthorization: Bearer s3cret\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.contains("\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));

        let text = String::from_utf8(encode_request("GET", "/v1/health", "h", None, None)).unwrap();
        assert!(!text.contains("Authorization"));
        assert!(!text.contains("Content-Length"));
        let text = String::from_utf8(encode_request("POST", "/x", "h", None, None)).unwrap();
        assert!(text.contains("Content-Length: 0\r\n"));
    }

    #[test]
    fn content_length_response_arrives_in_pieces() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\":12345}";
        for cut in 0..full.len() {
            assert_eq!(
                parse_response(&full[..cut], false, MAX).unwrap(),
                None,
                "cut {cut}"
            );
            assert!(matches!(
                parse_response(&full[..cut], true, MAX),
                Err(ParseError::Truncated { .. })
            ));
        }
        let r = parse_response(full, false, MAX).unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"a\":12345}");
        assert_eq!(r.header("Content-Type"), Some("application/json"));
    }

    #[test]
    fn extra_bytes_after_content_length_are_ignored() {
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}junk",
            false,
            MAX,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{}"[..]));
    }

    #[test]
    fn chunked_response() {
        let full = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_response(&full[..cut], false, MAX).unwrap(),
                None,
                "cut {cut}"
            );
        }
        let r = parse_response(full, false, MAX).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            "Wikipedia in\r\n\r\nchunks."
        );
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(
            parse_response(bad, false, MAX),
            Err(ParseError::Chunked(_))
        ));
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n";
        assert!(matches!(
            parse_response(bad, false, MAX),
            Err(ParseError::Chunked(_))
        ));
    }

    #[test]
    fn body_until_close() {
        let full = b"HTTP/1.1 500 Internal Server Error\r\n\r\noops";
        assert_eq!(parse_response(full, false, MAX).unwrap(), None);
        let r = parse_response(full, true, MAX).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (500, &b"oops"[..]));
    }

    #[test]
    fn interim_responses_are_skipped() {
        let full =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let r = parse_response(full, false, MAX).unwrap().unwrap();
        assert_eq!(r.status, 201);
        assert!(r.body.is_empty());
    }

    #[test]
    fn no_body_statuses() {
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false, MAX)
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 204);
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", false, 10),
            Err(ParseError::BodyTooLarge { limit: 10 })
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n",
                false,
                10
            ),
            Err(ParseError::BodyTooLarge { limit: 10 })
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n0123456789ab", false, 10),
            Err(ParseError::BodyTooLarge { limit: 10 })
        );
        assert_eq!(
            parse_response(&vec![b'a'; MAX_HEAD + 1], false, MAX),
            Err(ParseError::HeadTooLarge)
        );
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", false, MAX),
            Err(ParseError::StatusLine(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 2000 OK\r\n\r\n", false, MAX),
            Err(ParseError::StatusLine(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", false, MAX),
            Err(ParseError::Header(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false, MAX),
            Err(ParseError::ContentLength(_))
        ));
    }
}
