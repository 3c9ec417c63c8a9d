//! Finding the workspace's binaries (`ferry-agent`, `ferry-lab` itself for the reaper).

use std::{os::unix::fs::PermissionsExt, path::PathBuf};

use crate::LabError;

/// Where to look for `name`: `$FERRY_BIN_DIR`, then the directory of the running executable
/// and its two parents (test binaries live in `target/<profile>/deps`, binaries in
/// `target/<profile>`).
pub fn candidates(name: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
        v.push(PathBuf::from(dir).join(name));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(3) {
            v.push(dir.join(name));
        }
    }
    v
}

/// The first executable file named `name` among [`candidates`].
pub fn find_binary(name: &str, package: &str) -> Result<PathBuf, LabError> {
    let searched = candidates(name);
    searched
        .iter()
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .cloned()
        .ok_or_else(|| LabError::BinaryNotFound {
            name: name.to_owned(),
            package: package.to_owned(),
            searched,
        })
}
