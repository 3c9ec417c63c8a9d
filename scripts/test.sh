#!/usr/bin/env bash
# Runs every ferry test on this machine, installing whatever is missing first.
# Needs root (the acceptance tests build labs of network namespaces, load eBPF, run CRIU).
# Under CI=true a test that lacks root or a tool fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:$PATH"

step() { printf '\n== %s\n' "$*"; }

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
