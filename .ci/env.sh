# Sourced by .ci/run and by developers: build settings that keep RocksDB's C++ build out of
# the loop (see docs/maintainers.md). Prebuilt archives live outside the clone, keyed by the
# librocksdb-sys version in Cargo.lock.
FLOTILLA_CACHE=${FLOTILLA_CACHE:-/var/cache/flotilla}
_rocks_version=$(awk '/^name = "librocksdb-sys"$/ {getline; gsub(/"/, "", $3); print $3}' "$(dirname "${BASH_SOURCE[0]}")/../Cargo.lock")
export ROCKSDB_CACHE_DIR="$FLOTILLA_CACHE/rocksdb-$_rocks_version"
export ROCKSDB_LIB_DIR="$ROCKSDB_CACHE_DIR" ROCKSDB_STATIC=1
export SNAPPY_LIB_DIR="$ROCKSDB_CACHE_DIR" SNAPPY_STATIC=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$FLOTILLA_CACHE/target}
unset _rocks_version
