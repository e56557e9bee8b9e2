# Sourced by .ci/test, .ci/run and deploy/local-up: makes a fresh Debian 12 machine able to
# build and test Flotilla, and points the build at the prebuilt RocksDB archive.
#  - installs the Debian packages the build and tests need (when missing; needs root);
#  - builds RocksDB's static archive once per librocksdb-sys version into the cache
#    (about 15 minutes on 2 cores), so no later build compiles RocksDB's C++ again.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# containerd, runc and busybox-static: the CRI runtime tests (a real containerd, images built
# locally from the static busybox); containernetworking-plugins: the CNI bridge of their
# pod-network pods; protobuf-compiler: the CRI gRPC bindings.
# faketime: the chaos suite's clock-skew fault; iproute2: its network namespaces.
_packages=(libclang-dev prometheus python3-venv iptables containerd containernetworking-plugins runc busybox-static protobuf-compiler faketime iproute2)
_missing=()
for p in "${_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || _missing+=("$p")
done
if [ ${#_missing[@]} -gt 0 ]; then
  echo "setup: installing ${_missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${_missing[*]} (or install them yourself)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${_missing[@]}" >/dev/null
fi

# shellcheck source=/dev/null
source "$_root/.ci/env.sh"
if [ ! -f "$ROCKSDB_CACHE_DIR/librocksdb.a" ]; then
  echo "setup: building RocksDB once into $ROCKSDB_CACHE_DIR (this takes a while)" >&2
  _t="$FLOTILLA_CACHE/rocksdb-target"
  # Build the store crate in release without the prebuilt archive, so librocksdb-sys is
  # compiled with exactly the workspace's features (compression libraries included).
  (cd "$_root" && env -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC -u SNAPPY_LIB_DIR -u SNAPPY_STATIC \
    CARGO_TARGET_DIR="$_t" cargo build --release --locked -p flotilla-store)
  _out=""
  for d in $(ls -td "$_t"/release/build/librocksdb-sys-*/out 2>/dev/null || true); do
    if [ -f "$d/librocksdb.a" ]; then _out=$d; break; fi
  done
  [ -n "$_out" ] || { echo "setup: RocksDB build produced no librocksdb.a" >&2; exit 1; }
  mkdir -p "$ROCKSDB_CACHE_DIR.tmp"
  cp "$_out/librocksdb.a" "$_out/libsnappy.a" "$ROCKSDB_CACHE_DIR.tmp/"
  rm -rf "$ROCKSDB_CACHE_DIR" && mv "$ROCKSDB_CACHE_DIR.tmp" "$ROCKSDB_CACHE_DIR"
fi
# The official Kubernetes Python client, for the client-compatibility tests.
if [ ! -x "$FLOTILLA_CACHE/venv/bin/python" ] || ! "$FLOTILLA_CACHE/venv/bin/python" -c 'import kubernetes' 2>/dev/null; then
  echo "setup: installing the Kubernetes Python client into $FLOTILLA_CACHE/venv" >&2
  /usr/bin/python3 -m venv "$FLOTILLA_CACHE/venv"
  "$FLOTILLA_CACHE/venv/bin/pip" install -q 'kubernetes==37.0.2'
fi
export FLOTILLA_CACHE
unset _root _packages _missing _t _out
