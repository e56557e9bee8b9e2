#!/usr/bin/env bash
# The node agent's benchmark (issue 5's numbers): pod startup latency (created -> Running in
# a watch) for 100 pods on 2 agents, then each agent's CPU and memory with 110 pods per node;
# first with the process runtime, then with cri against a containerd started here (its own
# root, state and socket under a temporary directory; images built locally). Builds flotilla
# and apibench in release and leaves the JSON figures in benches/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
cargo build --release --locked --bin flotilla
(cd benches/apibench && cargo build --release)
mkdir -p benches/results
bench() { "$CARGO_TARGET_DIR/release/apibench" --flotilla "$CARGO_TARGET_DIR/release/flotilla" "$@"; }
stamp=$(date -u +%Y%m%dT%H%M%SZ)
bench --scenario startup --runtime process --agents 2 --pods 100 --concurrency 10 \
  --pods-per-node 110 --out "benches/results/startup-process-$stamp.json"

# containerd for the cri runtime, cleaned up however the run ends.
ctd=$(mktemp -d /var/tmp/flotilla-ctd.XXXXXX)
cleanup() {
  for p in $(pgrep -f "containerd-shim.*$ctd" || true); do pkill -9 -P "$p" || true; kill -9 "$p" || true; done
  [ -n "${ctd_pid:-}" ] && kill "$ctd_pid" 2>/dev/null && wait "$ctd_pid" 2>/dev/null || true
  grep " $ctd" /proc/self/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l || true
  rm -rf "$ctd"
}
trap cleanup EXIT
mkdir -p "$ctd/cni"
sed "s|@DIR@|$ctd|g" deploy/containerd/config.toml > "$ctd/config.toml"
containerd --config "$ctd/config.toml" > "$ctd/containerd.log" 2>&1 &
ctd_pid=$!
for _ in $(seq 100); do [ -S "$ctd/containerd.sock" ] && break; sleep 0.1; done
python3 deploy/images/build.py "$ctd/images" > /dev/null
for t in busybox pause; do ctr -a "$ctd/containerd.sock" -n k8s.io images import "$ctd/images/$t.tar" > /dev/null; done
bench --scenario startup --runtime cri --cri-endpoint "unix://$ctd/containerd.sock" --agents 2 \
  --pods 100 --concurrency 10 --pods-per-node 110 --out "benches/results/startup-cri-$stamp.json"
echo "figures: benches/results/startup-*-$stamp.json"
