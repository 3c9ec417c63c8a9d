#!/usr/bin/env bash
# ferry's main job on this machine: builds ferry, then runs the live demo in a lab of network
# namespaces (installs whatever is missing first; needs root). Tears the lab down on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:$PATH"
bash scripts/setup.sh
cargo build --release --locked --bins
exec target/release/ferry-lab demo "$@"
