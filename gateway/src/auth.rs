//! The bearer token: loading it safely at start, checking it in constant time per request.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use ferry_api::client::read_token_file;

/// Reads the daemon's token file. Refuses a missing or empty file and one that group or others
/// may read or write (mode & 0o077 ≠ 0): the token is the only thing guarding the registry.
pub fn load_server_token(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "token file {} is not a regular file",
            path.display()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {} has mode {mode:04o}: group and others must have no access \
             (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    read_token_file(path).map_err(|e| e.to_string())
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(std::hint::black_box(x ^ y));
    }
    diff == 0
}

/// Checks an `Authorization` header value against `token`; the error is the 401's message.
pub fn check_bearer(header: Option<&[u8]>, token: &str) -> Result<(), &'static str> {
    let Some(value) = header else {
        return Err("missing Authorization header: want `Authorization: Bearer <token>`");
    };
    let Some(given) = value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"bearer "))
    else {
        return Err("the Authorization header is not `Bearer <token>`");
    };
    if constant_time_eq(given.trim_ascii(), token.as_bytes()) {
        Ok(())
    } else {
        Err("wrong bearer token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abc\0", b"abc"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn bearer_headers() {
        assert!(check_bearer(Some(b"Bearer s3cret"), "s3cret").is_ok());
        assert!(check_bearer(Some(b"Bearer s3cret "), "s3cret").is_ok());
        assert_eq!(
            check_bearer(Some(b"Bearer s3cre"), "s3cret"),
            Err("wrong bearer token")
        );
        assert!(check_bearer(Some(b"Basic czNjcmV0"), "s3cret").is_err());
        assert!(check_bearer(Some(b"s3cret"), "s3cret").is_err());
        assert!(
            check_bearer(None, "s3cret")
                .unwrap_err()
                .contains("missing Authorization")
        );
    }

    #[test]
    fn token_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let e = load_server_token(&p).unwrap_err();
        assert!(
            e.contains("token file") && e.contains("No such file"),
            "{e}"
        );

        fs::write(&p, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let e = load_server_token(&p).unwrap_err();
            assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
            assert!(e.contains("chmod 600"), "{e}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_server_token(&p).unwrap(), "s3cret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_server_token(&p).unwrap(), "s3cret");

        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, "\n  \n").unwrap();
        assert!(load_server_token(&p).unwrap_err().contains("empty"));

        let e = load_server_token(dir.path()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
