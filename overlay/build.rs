//! Builds ferry's eBPF object (ebpf/ferry-ebpf) for bpfel-unknown-none with the pinned
//! toolchain, so `cargo build` of user space is all a developer runs. See docs/setup.md.
use anyhow::anyhow;
use aya_build::{Package, Toolchain};

/// Must match rust-toolchain.toml: bpf-linker 0.13 links LLVM 22, rustc 1.95's LLVM.
const EBPF_TOOLCHAIN: &str = "1.95.0";

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/ferry-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // -Z build-std=core on a stable toolchain: allowed for the nested eBPF build only.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [Package {
            name: "ferry-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
