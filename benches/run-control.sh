#!/usr/bin/env bash
# The control-plane benchmark (issue 4's numbers): scheduler throughput with 1,000 and 5,000
# nodes (a backlog of pending pods released at once, and pods created while the scheduler
# runs), and controller failover after kill -9 of the leader. Builds flotilla and apibench
# in release and leaves the JSON figures in benches/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
cargo build --release --locked --bin flotilla
(cd benches/apibench && cargo build --release)
mkdir -p benches/results
bench() { "$CARGO_TARGET_DIR/release/apibench" --flotilla "$CARGO_TARGET_DIR/release/flotilla" "$@"; }
stamp=$(date -u +%Y%m%dT%H%M%SZ)
bench --scenario failover --rounds 5 --out "benches/results/failover-$stamp.json"
bench --scenario scheduler --nodes 1000 --pods 10000 --backlog --out "benches/results/sched-1000-10000-backlog-$stamp.json"
bench --scenario scheduler --nodes 5000 --pods 50000 --backlog --out "benches/results/sched-5000-50000-backlog-$stamp.json"
bench --scenario scheduler --nodes 1000 --pods 10000 --out "benches/results/sched-1000-10000-$stamp.json"
bench --scenario scheduler --nodes 5000 --pods 20000 --out "benches/results/sched-5000-20000-$stamp.json"
echo "figures: benches/results/*-$stamp.json"
