//! The bearer token: loading it safely at start, checking it in constant time per request.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use ferry_api::client::read_token_file;
use subtle::ConstantTimeEq as _;

/// Why the daemon's token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {}: {source}", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "token file {} has mode {mode:04o}: group and others must have no access \
         (chmod 600 {})",
        path.display(),
        path.display()
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Read(#[from] ferry_api::ApiError),
}

/// Reads the daemon's token file. Refuses a missing or empty file and one that group or others
/// may read or write (mode & 0o077 ≠ 0): the token is the only thing guarding the registry.
pub fn load_server_token(path: &Path) -> Result<String, TokenError> {
    let meta = std::fs::metadata(path).map_err(|source| TokenError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(read_token_file(path)?)
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
    // In time that depends only on the lengths, not on where the bytes differ.
    if bool::from(given.trim_ascii().ct_eq(token.as_bytes())) {
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
    fn bearer_headers() {
        assert!(check_bearer(Some(b"Bearer s3cret"), "s3cret").is_ok());
        assert!(check_bearer(Some(b"Bearer s3cret "), "s3cret").is_ok());
        assert_eq!(
            check_bearer(Some(b"Bearer s3cre"), "s3cret"),
            Err("wrong bearer token")
        );
        assert!(check_bearer(Some(b"Bearer s3crets"), "s3cret").is_err());
        assert!(check_bearer(Some(b"Bearer "), "s3cret").is_err());
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
        let e = load_server_token(&p).unwrap_err().to_string();
        assert!(
            e.contains("token file") && e.contains("No such file"),
            "{e}"
        );

        fs::write(&p, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let e = load_server_token(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
            assert!(e.contains("chmod 600"), "{e}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_server_token(&p).unwrap(), "s3cret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_server_token(&p).unwrap(), "s3cret");

        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, "\n  \n").unwrap();
        assert!(
            load_server_token(&p)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );

        let e = load_server_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
