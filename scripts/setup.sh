#!/usr/bin/env bash
# ferry set-up: installs whatever is missing for building, testing and running ferry on a
# Debian bookworm machine (root). Idempotent: with everything present it only checks and exits.
#
#   scripts/setup.sh            install what is missing
#   scripts/setup.sh --check    report what is missing, change nothing (exit 1 if anything is)
#
# What it installs, and why (see docs/setup.md):
#   - Debian packages: iproute2/iperf3/socat/... for the lab, etcd-server for gateways that
#     share a registry, llvm-22-dev for bpf-linker, CRIU's build dependencies;
#   - rust-src for the pinned toolchain (the eBPF crate is built with -Z build-std=core);
#   - bpf-linker 0.13.0 linked against LLVM 22 (the LLVM of rustc 1.95);
#   - CRIU >= 4.2 built from Debian's own sid source package, installed as /usr/local/sbin/criu.
#     bookworm's 3.17 fails on kernels >= 6.13 (vDSO); 4.1 cannot dump any TCP socket on
#     kernels >= 6.16 (SO_PASSCRED is refused on inet sockets, fixed in 4.2). Only a deb-src
#     line is added. ferry's patches (scripts/criu-patches/*.patch) are applied before the
#     build; a CRIU built without the current set is rebuilt.
set -euo pipefail

CHECK_ONLY=0
[[ "${1:-}" == "--check" ]] && CHECK_ONLY=1

TOOLCHAIN=1.95.0
BPF_LINKER_VERSION=0.13.0
LLVM_MAJOR=22
CRIU_SUITE=sid
CRIU_MIN=4.2
CRIU_BIN=/usr/local/sbin/criu
CACHE_DIR=/var/cache/ferry
CRIU_PATCHES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-patches"
# Which patch set the installed CRIU was built with.
CRIU_PATCHES_STAMP=/usr/local/share/ferry/criu-patches
# CRIU's kernel-feature cache (criu.kdat) lives in a directory of its own, which must be a tmpfs:
# CRIU refuses to cache on disk, and where /run is on disk every CRIU would probe the kernel
# (tens of ms, a restore's inside the frozen window). See docs/migration.md.
CRIU_RUNDIR=/run/criu
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

APT_PACKAGES=(
  # lab and tests
  iproute2 iputils-ping curl iperf3 socat tcpdump nftables iptables procps psmisc ethtool kmod python3
  # git: its `git apply` applies ferry's CRIU patches (scripts/criu-patches) before the build
  git
  # the unmodified Debian server the CRIU tests migrate
  redis-server
  # etcd, the registry's store shared by several gateways (gateway --store etcd:...)
  etcd-server
  # OCI containers: runc (1.1.5 works with CRIU 4.2.1, see docs/migration.md), Podman (its
  # CNI backend with ferry-cni; runc its runtime: crun lacks CRIU support here) and the
  # busybox of the lab's root file systems (ferry-lab image build redis)
  podman runc busybox-static
  # bpf-linker
  "llvm-${LLVM_MAJOR}-dev" libzstd-dev zlib1g-dev
  # CRIU build dependencies (bookworm versions)
  build-essential pkg-config protobuf-c-compiler libprotobuf-c-dev protobuf-compiler
  libprotobuf-dev libnl-3-dev libnet1-dev libcap-dev uuid-dev libbsd-dev libnftables-dev
  libgnutls28-dev python3-protobuf xz-utils dpkg-dev
)

log() { printf '[setup] %s\n' "$*" >&2; }
missing=()
t0=$(date +%s.%N)

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (installs Debian packages and CRIU)"; exit 1
fi

# --- Debian packages ---------------------------------------------------------------------------
apt_missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || apt_missing+=("$p")
done
apt_updated=0
apt_update() {
  if [[ $apt_updated -eq 0 ]]; then
    log "apt-get update"; apt-get update -qq; apt_updated=1
  fi
}
if ((${#apt_missing[@]})); then
  if ((CHECK_ONLY)); then missing+=("apt: ${apt_missing[*]}"); else
    apt_update
    log "installing Debian packages: ${apt_missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
  fi
fi

# --- Rust toolchain pieces ----------------------------------------------------------------------
if ! rustup toolchain list | grep -q "^${TOOLCHAIN}-"; then
  if ((CHECK_ONLY)); then missing+=("rust toolchain ${TOOLCHAIN}"); else
    log "installing rust ${TOOLCHAIN} (not made the default)"
    rustup toolchain install "${TOOLCHAIN}" --profile minimal --component rustfmt,clippy
  fi
fi
for comp in rust-src rustfmt clippy; do
  if ! rustup component list --installed --toolchain "${TOOLCHAIN}" 2>/dev/null | grep -q "^${comp}"; then
    if ((CHECK_ONLY)); then missing+=("rustup component ${comp}"); else
      log "adding ${comp} to ${TOOLCHAIN}"
      rustup component add "${comp}" --toolchain "${TOOLCHAIN}"
    fi
  fi
done

if ! bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
  if ((CHECK_ONLY)); then missing+=("bpf-linker ${BPF_LINKER_VERSION}"); else
    log "building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_MAJOR} (about a minute)"
    LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo "+${TOOLCHAIN}" install "bpf-linker@${BPF_LINKER_VERSION}" \
      --locked --no-default-features --features "llvm-${LLVM_MAJOR}" --quiet
  fi
fi

# --- CRIU >= 4.2 ----------------------------------------------------------------------------------
criu_patches_id() {
  { cat "$CRIU_PATCHES_DIR"/*.patch 2>/dev/null; echo "RUNDIR=$CRIU_RUNDIR"; } | sha256sum | cut -c1-16
}
criu_ok() {
  [[ -x "$CRIU_BIN" ]] || return 1
  [[ "$(cat "$CRIU_PATCHES_STAMP" 2>/dev/null)" == "$(criu_patches_id)" ]] || return 1
  local v
  v=$("$CRIU_BIN" --version 2>/dev/null | awk '/^Version:/{print $2}')
  [[ -n "$v" ]] || return 1
  [[ "$(printf '%s\n%s\n' "$CRIU_MIN" "$v" | sort -V | head -1)" == "$CRIU_MIN" ]] || return 1
  "$CRIU_BIN" check >/dev/null 2>&1
}
if ! criu_ok; then
  if ((CHECK_ONLY)); then missing+=("criu >= ${CRIU_MIN} at ${CRIU_BIN}"); else
    src_list=/etc/apt/sources.list.d/ferry-criu-src.sources
    if ! grep -qx "Suites: ${CRIU_SUITE}" "$src_list" 2>/dev/null; then
      # deb-src ONLY: binaries stay bookworm's. Same archive apt already uses.
      cat >"$src_list" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: ${CRIU_SUITE}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
      apt_updated=0
    fi
    apt_update
    mkdir -p "$CACHE_DIR/criu"
    cd "$CACHE_DIR/criu"
    if ! ls criu_${CRIU_MIN}*.orig.tar.* >/dev/null 2>&1; then
      log "fetching CRIU source (Debian ${CRIU_SUITE})"
      # The .debian.tar.xz / .dsc may answer 404; the checksum-verified orig tarball is what we need.
      apt-get source --download-only "criu/${CRIU_SUITE}" >/dev/null 2>&1 || true
    fi
    orig=$(ls criu_${CRIU_MIN}*.orig.tar.* 2>/dev/null | sort -V | tail -1 || true)
    [[ -n "$orig" ]] || { log "CRIU source tarball did not arrive"; exit 1; }
    rm -rf build && mkdir build
    tar -xf "$orig" -C build --strip-components=1
    for p in "$CRIU_PATCHES_DIR"/*.patch; do
      [[ -e "$p" ]] || continue
      log "patching CRIU: $(basename "$p")"
      (cd build && git apply "$p") || { log "CRIU patch $p does not apply to $orig"; exit 1; }
    done
    log "building CRIU from $orig (about 20 s)"
    make -C build -j"$(nproc)" RUNDIR="$CRIU_RUNDIR" criu >build.log 2>&1 || { tail -30 build.log; log "CRIU build failed (log: $CACHE_DIR/criu/build.log)"; exit 1; }
    install -m 0755 build/criu/criu "$CRIU_BIN"
    mkdir -p "$(dirname "$CRIU_PATCHES_STAMP")"
    criu_patches_id >"$CRIU_PATCHES_STAMP"
    criu_ok || { "$CRIU_BIN" check || true; log "installed CRIU fails 'criu check'"; exit 1; }
    log "installed $("$CRIU_BIN" --version | head -1) at $CRIU_BIN"
  fi
fi

# --- kernel facilities the lab needs ---------------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
  if ((CHECK_ONLY)); then missing+=("bpffs at /sys/fs/bpf"); else mount -t bpf bpf /sys/fs/bpf; fi
fi
mkdir -p /run/netns
# CRIU's kernel-feature cache on a tmpfs (the agent does the same at start, e.g. after a reboot).
if [[ "$(stat -f -c %T "$CRIU_RUNDIR" 2>/dev/null)" != tmpfs ]]; then
  if ((CHECK_ONLY)); then missing+=("tmpfs at $CRIU_RUNDIR"); else
    mkdir -p -m 0700 "$CRIU_RUNDIR"
    [[ "$(stat -f -c %T "$CRIU_RUNDIR")" == tmpfs ]] || mount -t tmpfs -o size=1m,mode=0700,nosuid,nodev,noexec tmpfs "$CRIU_RUNDIR"
  fi
fi

t1=$(date +%s.%N)
if ((CHECK_ONLY)) && ((${#missing[@]})); then
  printf '[setup] missing: %s\n' "${missing[@]}" >&2; exit 1
fi
log "ready ($(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s)"
