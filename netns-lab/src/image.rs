//! Root file systems for runc containers without an image registry: built from the host's
//! installed Debian packages and cached.
//!
//! An image is a directory `<cache>/<name>-<key>` (default cache
//! [`ferry_config::DEFAULT_IMAGES_DIR`], `/var/cache/ferry/rootfs`, the agents' default
//! `[runtime] images_dir`), and its directory name is what a start request names
//! (`"image": "redis-1a2b3c4d5e6f7a8b"`). The recipe of `redis`:
//!
//! - `redis-server` (the real file behind Debian's `/usr/bin/redis-server` symlink) and
//!   `busybox` (busybox-static: a shell and the usual tools for debugging, `sh` linked to it);
//! - the dynamic-library closure of every binary (`ldd`), each file at its merged-/usr path
//!   (`/lib64/ld-linux-x86-64.so.2` → `usr/lib64/…`, with `lib64 → usr/lib64` and friends as
//!   symlinks, as bookworm lays it out), under the name the loader looks for;
//! - a minimal `/etc` (passwd, group, hosts, an empty resolv.conf), the mount points (`/proc`,
//!   `/sys`, `/dev`, `/tmp`, `/run`) and a manifest `/.ferry-image.json`.
//!
//! Why copies of installed files and not `debootstrap --variant=minbase` + redis-server: the
//! same packages the host runs, no download, about 19 MB instead of 235 MB, built in well
//! under a second (debootstrap: about 30 s with network), and a key that follows the host's
//! packages. It is not a Debian system (no dpkg database, no apt): a container image, not a
//! distribution.
//!
//! **The key** is the first 16 hex digits of the SHA-256 of the recipe (its version, its
//! files) and of `package=version` of every Debian package that owns a copied file
//! (`dpkg-query -S`, `dpkg-query -W`): the same packages give the same name on every host (so a
//! container finds its image wherever it moves), and an upgrade gives a new image.
//!
//! **Atomic**: built in `<cache>/.build-<name>-<key>-<pid>`, renamed into place at the end; a
//! killed build leaves only its temporary directory, removed by the next build (when its PID
//! is gone). Two builds at once: the first rename wins, the other discards its copy. A second
//! build with the same packages returns the cached directory at once.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

/// The recipes' version: bump it when a recipe changes what it puts in an image.
pub const RECIPE_VERSION: u32 = 2;
/// The manifest inside every image.
pub const MANIFEST: &str = ".ferry-image.json";
/// Names of the images this module can build.
pub const RECIPES: &[&str] = &["redis"];

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image {0:?}: this lab builds {recipes}", recipes = RECIPES.join(", "))]
    UnknownRecipe(String),
    #[error("{path} is missing: install the Debian package {package} (scripts/setup.sh does)")]
    Missing {
        path: PathBuf,
        package: &'static str,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path} belongs to no installed Debian package (dpkg-query -S): {why}")]
    NoPackage { path: PathBuf, why: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// What goes into an image of a recipe: binaries (source on the host → path in the image),
/// symlinks inside the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub name: &'static str,
    /// (host path, followed to the real file; path in the image; the package that has it).
    pub binaries: Vec<(&'static str, &'static str, &'static str)>,
    /// (link in the image, its target).
    pub links: Vec<(&'static str, &'static str)>,
    /// Empty directories (path in the image, mode).
    pub dirs: Vec<(&'static str, u32)>,
}

/// The recipe called `name`.
pub fn recipe(name: &str) -> Result<Recipe, ImageError> {
    match name {
        "redis" => Ok(Recipe {
            name: "redis",
            binaries: vec![
                (
                    "/usr/bin/redis-server",
                    "usr/bin/redis-server",
                    "redis-server",
                ),
                ("/usr/bin/busybox", "usr/bin/busybox", "busybox-static"),
            ],
            links: vec![("usr/bin/sh", "busybox")],
            dirs: vec![
                ("proc", 0o555),
                ("sys", 0o555),
                ("dev", 0o755),
                ("tmp", 0o1777),
                ("run", 0o755),
                ("root", 0o700),
                ("etc", 0o755),
            ],
        }),
        other => Err(ImageError::UnknownRecipe(other.to_owned())),
    }
}

/// A built (or cached) image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The directory's name: what a start request's `image` says.
    pub image: String,
    /// The recipe.
    pub name: String,
    pub key: String,
    pub path: PathBuf,
    /// Debian packages (`package=version`) whose files are in it.
    pub packages: Vec<String>,
    /// Files copied (paths in the image).
    pub files: Vec<String>,
    /// Built now (false: it was in the cache).
    #[serde(skip)]
    pub built: bool,
}

/// One file of the image: where it comes from on the host, where it goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FileCopy {
    /// The path to ask dpkg about (as the loader or the recipe names it).
    pub host: PathBuf,
    /// Relative path in the image.
    pub dest: PathBuf,
}

/// `ldd` output → the libraries' paths (the loader included), in order; the vDSO and
/// statically linked binaries give none. Pure, for tests.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)"; "linux-vdso.so.1 (0x…)" has no path.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            v.push(PathBuf::from(p));
        }
    }
    v
}

/// Where a host path lives in a merged-/usr image (`/lib/…` → `usr/lib/…`, also `/lib64`,
/// `/bin`, `/sbin`), relative to the image's root. Pure, for tests.
pub fn merged_usr(path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let first = rel.components().next().map(|c| c.as_os_str().to_owned());
    match first.as_ref().and_then(|f| f.to_str()) {
        Some("lib" | "lib64" | "bin" | "sbin") => Path::new("usr").join(rel),
        _ => rel.to_owned(),
    }
}

/// The key of an image: recipe version and name, the files, the packages (sorted). Pure.
pub fn key(recipe: &str, files: &[FileCopy], packages: &[String]) -> String {
    let mut text = format!("ferry-image v{RECIPE_VERSION}\nrecipe {recipe}\n");
    let mut dests: Vec<String> = files.iter().map(|f| f.dest.display().to_string()).collect();
    dests.sort();
    for d in dests {
        let _ = writeln!(text, "file {d}");
    }
    let mut packages = packages.to_vec();
    packages.sort();
    for p in packages {
        let _ = writeln!(text, "package {p}");
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn run(program: &str, args: &[&str]) -> Result<String, ImageError> {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(io(format!("running {program}")))?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The files of `recipe` (its binaries and their libraries).
fn files_of(recipe: &Recipe) -> Result<Vec<FileCopy>, ImageError> {
    let mut files: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for (host, dest, package) in &recipe.binaries {
        let host = Path::new(host);
        if !host.exists() {
            return Err(ImageError::Missing {
                path: host.to_owned(),
                package,
            });
        }
        files.insert(PathBuf::from(dest), host.to_owned());
        // A static binary: ldd exits 1 ("not a dynamic executable").
        let libs = match run("ldd", &[&host.to_string_lossy()]) {
            Ok(text) => parse_ldd(&text),
            Err(ImageError::Command { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        for lib in libs {
            files.insert(merged_usr(&lib), lib);
        }
    }
    Ok(files
        .into_iter()
        .map(|(dest, host)| FileCopy { host, dest })
        .collect())
}

/// `path` at its other merged-/usr spelling (`/usr/lib/x` ↔ `/lib/x`).
fn other_spelling(path: &Path) -> PathBuf {
    match path.strip_prefix("/usr") {
        Ok(rest) => Path::new("/").join(rest),
        Err(_) => Path::new("/usr").join(path.strip_prefix("/").unwrap_or(path)),
    }
}

/// `dpkg-query -S` output → path → package (the first one named). Pure, for tests.
pub fn parse_dpkg_search(text: &str) -> BTreeMap<PathBuf, String> {
    text.lines()
        // "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6" ("a, b: /path" if shared)
        .filter_map(|l| l.split_once(": "))
        .map(|(pkgs, path)| {
            let pkg = pkgs.split(", ").next().unwrap_or(pkgs).trim().to_owned();
            (PathBuf::from(path.trim()), pkg)
        })
        .collect()
}

/// The Debian packages that own the files: for each, the package of the path as named (a
/// symlink's) and the one of the real file behind it, each looked up at both merged-/usr
/// spellings; one `dpkg-query -S` for all of them.
fn owners(files: &[FileCopy]) -> Result<Vec<String>, ImageError> {
    let mut asked: Vec<String> = Vec::new();
    let mut per_file = Vec::new();
    for f in files {
        let real = std::fs::canonicalize(&f.host).unwrap_or_else(|_| f.host.clone());
        let named = [f.host.clone(), other_spelling(&f.host)];
        let behind = [real.clone(), other_spelling(&real)];
        asked.extend(named.iter().chain(&behind).map(|p| p.display().to_string()));
        per_file.push((f.host.clone(), named, behind));
    }
    asked.sort();
    asked.dedup();
    let mut cmd = Command::new("dpkg-query");
    cmd.arg("-S").args(&asked).env("LC_ALL", "C");
    // Exit status 1 when some spelling is unknown (expected: one of the two is): the output
    // of those it found is what counts.
    let out = cmd.output().map_err(io("running dpkg-query -S"))?;
    let found = parse_dpkg_search(&String::from_utf8_lossy(&out.stdout));
    let mut v = Vec::new();
    for (host, named, behind) in per_file {
        let pkg = named
            .iter()
            .find_map(|p| found.get(p))
            .ok_or_else(|| ImageError::NoPackage {
                path: host.clone(),
                why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })?;
        v.push(pkg.clone());
        if let Some(p) = behind.iter().find_map(|p| found.get(p)) {
            v.push(p.clone());
        }
    }
    v.sort();
    v.dedup();
    Ok(v)
}

/// `package=version` for every package, sorted.
fn versions(packages: &[String]) -> Result<Vec<String>, ImageError> {
    let mut args = vec!["-W", "-f=${binary:Package}=${Version}\\n"];
    args.extend(packages.iter().map(String::as_str));
    let text = run("dpkg-query", &args)?;
    let mut v: Vec<String> = text.lines().map(str::to_owned).collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Builds the image of recipe `name` in the default cache, or returns the cached one.
pub fn build(name: &str) -> Result<Image, ImageError> {
    build_in(Path::new(ferry_config::DEFAULT_IMAGES_DIR), name)
}

/// Builds the image of recipe `name` in `cache`, or returns the cached one.
pub fn build_in(cache: &Path, name: &str) -> Result<Image, ImageError> {
    let recipe = recipe(name)?;
    let files = files_of(&recipe)?;
    let packages = versions(&owners(&files)?)?;
    let key = key(recipe.name, &files, &packages);
    let image = format!("{}-{key}", recipe.name);
    let path = cache.join(&image);
    let mut out = Image {
        image: image.clone(),
        name: recipe.name.to_owned(),
        key: key.clone(),
        path: path.clone(),
        packages,
        files: files.iter().map(|f| f.dest.display().to_string()).collect(),
        built: false,
    };
    if path.join(MANIFEST).exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache).map_err(io(format!("creating {}", cache.display())))?;
    remove_stale_builds(cache, recipe.name);
    let tmp = cache.join(format!(".build-{image}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let r = populate(&tmp, &recipe, &files, &out);
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match std::fs::rename(&tmp, &path) {
        Ok(()) => out.built = true,
        // Another build got there first: its image is the same.
        Err(_) if path.join(MANIFEST).exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ImageError::Io {
                context: format!("renaming {} to {}", tmp.display(), path.display()),
                source: e,
            });
        }
    }
    Ok(out)
}

/// `.build-<name>-*-<pid>` directories of builds whose process is gone.
fn remove_stale_builds(cache: &Path, name: &str) {
    let Ok(dir) = std::fs::read_dir(cache) else {
        return;
    };
    let start = format!(".build-{name}-");
    for e in dir.filter_map(Result::ok) {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&start)
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Writes the image's tree into `root`.
fn populate(
    root: &Path,
    recipe: &Recipe,
    files: &[FileCopy],
    image: &Image,
) -> Result<(), ImageError> {
    let mkdir = |rel: &str, mode: u32| -> Result<(), ImageError> {
        let p = root.join(rel);
        std::fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {}", p.display())))
    };
    mkdir("", 0o755)?;
    for d in ["usr/bin", "usr/sbin", "usr/lib", "usr/lib64"] {
        mkdir(d, 0o755)?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(target, root.join(link)).map_err(io(format!("symlink {link}")))?;
    }
    for (d, mode) in &recipe.dirs {
        mkdir(d, *mode)?;
    }
    for f in files {
        let dest = root.join(&f.dest);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        // The real file's content under the name the loader (or the recipe) uses.
        std::fs::copy(&f.host, &dest).map_err(io(format!(
            "copying {} to {}",
            f.host.display(),
            dest.display()
        )))?;
    }
    for (link, target) in &recipe.links {
        symlink(target, root.join(link)).map_err(io(format!("symlink {link}")))?;
    }
    let etc = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n"),
        ("etc/resolv.conf", ""),
    ];
    for (rel, text) in etc {
        std::fs::write(root.join(rel), text).map_err(io(format!("writing {rel}")))?;
    }
    let manifest = serde_json::to_vec_pretty(image).expect("an image serializes");
    std::fs::write(root.join(MANIFEST), manifest).map_err(io("writing the manifest"))?;
    Ok(())
}

/// redis-server's arguments (its data directory on the container's tmpfs under runc), for the benches and tests.
pub fn redis_args(binary: &str, dir: &str) -> Vec<String> {
    [
        binary,
        "--port",
        "6379",
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir,
        "--logfile",
        "",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_empty());
    }

    #[test]
    fn dpkg_search_output_names_the_owner() {
        let text = "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6\nredis-server: /usr/bin/redis-server\n\
                    a, b: /usr/share/x\n";
        let m = parse_dpkg_search(text);
        assert_eq!(
            m[Path::new("/lib/x86_64-linux-gnu/libc.so.6")],
            "libc6:amd64"
        );
        assert_eq!(m[Path::new("/usr/bin/redis-server")], "redis-server");
        assert_eq!(m[Path::new("/usr/share/x")], "a");
        assert_eq!(
            other_spelling(Path::new("/usr/lib/x")),
            PathBuf::from("/lib/x")
        );
        assert_eq!(
            other_spelling(Path::new("/lib/x")),
            PathBuf::from("/usr/lib/x")
        );
    }

    #[test]
    fn paths_land_where_merged_usr_puts_them() {
        for (host, image) in [
            (
                "/lib64/ld-linux-x86-64.so.2",
                "usr/lib64/ld-linux-x86-64.so.2",
            ),
            (
                "/lib/x86_64-linux-gnu/libc.so.6",
                "usr/lib/x86_64-linux-gnu/libc.so.6",
            ),
            (
                "/usr/lib/x86_64-linux-gnu/libz.so.1",
                "usr/lib/x86_64-linux-gnu/libz.so.1",
            ),
            ("/bin/busybox", "usr/bin/busybox"),
            ("/etc/x", "etc/x"),
        ] {
            assert_eq!(merged_usr(Path::new(host)), PathBuf::from(image), "{host}");
        }
    }

    #[test]
    fn the_key_follows_packages_and_files_not_their_order() {
        let f = |d: &str| FileCopy {
            host: PathBuf::from("/x"),
            dest: PathBuf::from(d),
        };
        let p = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let k = key(
            "redis",
            &[f("a"), f("b")],
            &p(&["libc6:amd64=2.36-9", "redis=7"]),
        );
        assert_eq!(k.len(), 16);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
        assert_eq!(
            k,
            key(
                "redis",
                &[f("b"), f("a")],
                &p(&["redis=7", "libc6:amd64=2.36-9"])
            )
        );
        assert_ne!(
            k,
            key(
                "redis",
                &[f("a"), f("b")],
                &p(&["libc6:amd64=2.36-10", "redis=7"])
            )
        );
        assert_ne!(
            k,
            key("redis", &[f("a")], &p(&["libc6:amd64=2.36-9", "redis=7"]))
        );
        assert_ne!(
            k,
            key(
                "other",
                &[f("a"), f("b")],
                &p(&["libc6:amd64=2.36-9", "redis=7"])
            )
        );
    }

    #[test]
    fn unknown_recipes_are_refused_by_name() {
        let e = recipe("nginx").unwrap_err().to_string();
        assert!(
            e.contains("unknown image \"nginx\"") && e.contains("redis"),
            "{e}"
        );
    }

    /// Builds the real image into a temporary cache (no root needed: files are copied from
    /// the host's packages), then again: the second is the cached one; a stale temporary
    /// directory of a dead build is removed.
    #[test]
    fn builds_once_then_comes_from_the_cache() {
        if !Path::new("/usr/bin/redis-server").exists() || !Path::new("/usr/bin/busybox").exists() {
            eprintln!("SKIP: redis-server or busybox-static not installed");
            return;
        }
        let cache = std::env::temp_dir().join(format!("ferry-image-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir_all(&cache).unwrap();
        // A build killed half-way (PID 0 never names a live build here).
        let stale = cache.join(".build-redis-0123456789abcdef-999999999");
        std::fs::create_dir_all(stale.join("usr")).unwrap();
        let first = build_in(&cache, "redis").unwrap();
        assert!(first.built);
        assert!(!stale.exists(), "the stale build directory is removed");
        assert_eq!(first.image, format!("redis-{}", first.key));
        assert_eq!(first.path, cache.join(&first.image));
        for f in [
            "usr/bin/redis-server",
            "usr/bin/busybox",
            "usr/lib64/ld-linux-x86-64.so.2",
        ] {
            assert!(first.path.join(f).is_file(), "{f}");
        }
        assert!(first.path.join("bin/sh").exists());
        assert!(
            first.packages.iter().any(|p| p.starts_with("redis-server")),
            "{:?}",
            first.packages
        );
        assert!(
            first.packages.iter().any(|p| p.starts_with("libc6")),
            "{:?}",
            first.packages
        );
        let manifest: Image =
            serde_json::from_slice(&std::fs::read(first.path.join(MANIFEST)).unwrap()).unwrap();
        assert_eq!(manifest.key, first.key);
        let again = build_in(&cache, "redis").unwrap();
        assert!(!again.built);
        assert_eq!(
            again,
            Image {
                built: false,
                ..first
            }
        );
        let leftovers: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(leftovers, [again.image.as_str()]);
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
