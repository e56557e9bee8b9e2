#!/usr/bin/env bash
# The Kubernetes API benchmark (issue 3's numbers): mutating-call latency at 20 changes/s with
# 1,000 watchers open, watch delivery latency, GET/LIST latency, and creating and listing
# 10,000 pods. Builds flotilla and apibench in release and leaves the JSON figures in
# benches/results/. Extra arguments go to apibench (e.g. --watchers 100 --seconds 10 --pods 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
cargo build --release --locked --bin flotilla
(cd benches/apibench && cargo build --release)
mkdir -p benches/results
out="benches/results/api-$(date -u +%Y%m%dT%H%M%SZ).json"
"$CARGO_TARGET_DIR/release/apibench" --flotilla "$CARGO_TARGET_DIR/release/flotilla" --out "$out" "$@"
echo "figures: $out"
