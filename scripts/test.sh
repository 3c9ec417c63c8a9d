#!/usr/bin/env bash
# Runs every ferry test on this machine, installing whatever is missing first.
# Needs root (the acceptance tests build labs of network namespaces, load eBPF, run CRIU).
# Under CI=true a test that lacks root or a tool fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:$PATH"

step() { printf '\n== %s\n' "$*"; }

# A build used once keeps nothing from incremental state: under CI it only costs disk.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi

# The cold build and the labs need a few GB; say so plainly rather than fail mid-link.
need_kb=$((6 * 1024 * 1024))
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [ "${free_kb:-0}" -lt "$need_kb" ]; then
    echo "warning: $((free_kb / 1024)) MB free where ferry builds; a cold build and the tests need about 6 GB" >&2
fi

step "set-up"
bash scripts/setup.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings   # default members: the eBPF crate only builds for bpfel

step "build (the lab's tests start the real binaries)"
cargo build --bins --locked

step "tests"
# Lab tests are independent (unique prefixes); two at a time keeps a 2-core machine responsive.
cargo test --locked -- --test-threads="${FERRY_TEST_THREADS:-2}" "$@"
