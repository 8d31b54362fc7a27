# Sourced by the build scripts: one cargo target dir outside the clone, and RocksDB's C++
# compiled once per machine. librocksdb-sys compiles RocksDB (~25 min on 2 cores) whenever
# its build script reruns, which also happens when an unrelated dependency change shifts
# shared build-dependency features; so the first librocksdb.a built is kept in a cache keyed
# by the crate version, its features (lz4) and the target CPU (.cargo/config.toml), and later
# builds link it (ROCKSDB_LIB_DIR + ROCKSDB_STATIC) instead of compiling it again.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/snapblk/target}
_rocks_ver=$(awk '/^name = "librocksdb-sys"$/ {getline; gsub(/"/, "", $3); print $3}' Cargo.lock)
ROCKSDB_CACHE=/var/cache/snapblk/rocksdb-${_rocks_ver}-lz4-x86-64-v2
if [ -f "$ROCKSDB_CACHE/librocksdb.a" ]; then
    export ROCKSDB_LIB_DIR=$ROCKSDB_CACHE ROCKSDB_STATIC=1
fi

# Called after a successful build: keeps the librocksdb.a cargo just built.
save_rocksdb_cache() {
    [ -f "$ROCKSDB_CACHE/librocksdb.a" ] && return 0
    local a
    a=$(ls -t "$CARGO_TARGET_DIR"/release/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -1)
    [ -n "$a" ] || return 0
    mkdir -p "$ROCKSDB_CACHE" && cp "$a" "$ROCKSDB_CACHE/librocksdb.a.tmp" && mv "$ROCKSDB_CACHE/librocksdb.a.tmp" "$ROCKSDB_CACHE/librocksdb.a"
}
