#!/usr/bin/env bash
# Backup repository at scale (issue 12), in one run, against a local S3-compatible server
# (s3s-fs) behind the counting proxy (tests/e2e/s3_fault_proxy.py):
#  1. requests: three pools (three daemons) back up one volume each into one repository,
#     a 1% incremental at a time, until BACKUPS are stored; at 50 and at BACKUPS stored,
#     pool A's S3 requests are counted for a 1% incremental backup, `backup list` and a
#     full restore. Target: ratio <= 1.2.
#  2. memory: full backups and restores of random volumes of each size in BIG_MIBS, run
#     by the CLI on the pool directly; peak RSS less the RSS once the pool is open (the
#     CLI reports both; the median of three runs of each), and the slope per TiB of
#     repository between the sizes. Target:
#     <= 256 MiB per TiB.
#  3. lazy restore of the first big volume: time from the command to the first read, and a sequential
#     read of an unhydrated range against `aws s3 cp` download of the same bytes.
#     Targets: < 1 s; >= 0.5x.
# Usage: benches/backup_scale.sh [BACKUPS=200] [SMALL_MIB=256] [BIG_MIBS="4096 16384"]
# Needs root (drop_caches) and ~3x the largest size of free disk.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKUPS=${1:-200}
SMALL_MIB=${2:-256}
BIG_MIBS=${3:-"4096 16384"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/snapblk/target}
BIN=${SNAPBLK_BIN:-$CARGO_TARGET_DIR/release/snapblk}
S3S=/var/cache/snapblk/tools/bin/s3s-fs
PROXY=$PWD/tests/e2e/s3_fault_proxy.py
[ -x "$BIN" ] || { echo "build snapblk first (cargo build --release)" >&2; exit 2; }
[ -x "$S3S" ] || { echo "s3s-fs missing: run scripts/setup.sh" >&2; exit 2; }
W=$(mktemp -d /var/tmp/snapblk-sbench.XXXXXX)
PIDS=()
cleanup() { set +e; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; pkill -f "$W/" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_EC2_METADATA_DISABLED=true AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1
export SNAPBLK_STATE_DIR=$W/state
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3_PORT=$(free_port)
mkdir -p "$W/s3"
"$S3S" --host 127.0.0.1 --port "$S3_PORT" --access-key bench --secret-key bench-secret "$W/s3" >"$W/s3.log" 2>&1 &
PIDS+=($!)
python3 "$PROXY" serve --upstream "127.0.0.1:$S3_PORT" --ready "$W/proxy.ready" >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do [ -s "$W/proxy.ready" ] && break; sleep 0.05; done
jget() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }
PROXY_PORT=$(jget '["port"]' <"$W/proxy.ready")
PROXY_CTL=$(jget '["control"]' <"$W/proxy.ready")
DIRECT=http://127.0.0.1:$S3_PORT
COUNTED=http://127.0.0.1:$PROXY_PORT
REPO=s3://bench/repo
head -c 32 /dev/urandom >"$W/key"; export SNAPBLK_KEY_FILE=$W/key
ctl() { python3 "$PROXY" ctl "$PROXY_CTL" "$@"; }
# requests since the last reset: "total GET PUT LIST DELETE HEAD"
counted() {
    ctl stats | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("requests",0), *(d.get("req_"+k,0) for k in ("GET","PUT","LIST","DELETE","HEAD")))'
}

# Pools A, B, C: one daemon each.
start_daemon() {
    local p=$1
    "$BIN" daemon --meta "$W/$p/meta" --data "$W/$p/data.img" --nbd-socket "$W/$p/nbd.sock" \
        --nbd-tcp none --socket "$W/$p/control.sock" 2>>"$W/$p/daemon.log" &
    PIDS+=($!)
    echo $! >"$W/$p/pid"
    for _ in $(seq 200); do [ -S "$W/$p/nbd.sock" ] && [ -S "$W/$p/control.sock" ] && break; sleep 0.05; done
}
stop_daemon() {
    local pid; pid=$(cat "$W/$1/pid")
    kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$W/$1/nbd.sock" "$W/$1/control.sock"
}
for p in A B C; do
    mkdir -p "$W/$p"
    "$BIN" pool create --meta "$W/$p/meta" --data "$W/$p/data.img" --size 64G >/dev/null
    start_daemon $p
done
sb() { local p=$1; shift; "$BIN" --socket "$W/$p/control.sock" "$@"; }
uri() { echo "nbd+unix:///$2?socket=$W/$1/nbd.sock"; }
sb A repo init "$REPO" --endpoint "$DIRECT" >/dev/null

declare -A GEN
for p in A B C; do
    sb $p volume create v --size "${SMALL_MIB}M" >/dev/null
    head -c "${SMALL_MIB}M" /dev/urandom | nbdcopy - "$(uri $p v)"
    sb $p snapshot create v@s0 >/dev/null
    sb $p backup v@s0 --to "$REPO" --endpoint "$DIRECT" >/dev/null
    GEN[$p]=0
done
stored=3
one_percent() { /usr/bin/python3 tests/e2e/nbd_write_random.py "$(uri "$1" v)" $((SMALL_MIB * 16 / 100)) 65536; }
# Writes 1%, snapshots and backs up pool $1's volume (through $2: the endpoint).
step() {
    local p=$1 ep=$2 g=$((GEN[$1] + 1))
    one_percent "$p"
    sb "$p" snapshot create "v@s$g" >/dev/null
    sb "$p" backup "v@s$g" --to "$REPO" --endpoint "$ep" >/dev/null
    sb "$p" snapshot delete "v@s$((g - 1))" >/dev/null
    GEN[$p]=$g
}
declare -A REQ
measure() {
    local at=$1 g k
    # The incrementals: only pool A's backup jobs are counted, INCS of them in a row (a
    # backup that compacts its packs uploads more, every few backups: the amortised cost
    # is what must not grow).
    ctl reset >/dev/null
    for k in $(seq 1 "$INCS"); do
        one_percent A
        g=$((GEN[A] + 1))
        sb A snapshot create "v@s$g" >/dev/null
        sb A backup "v@s$g" --to "$REPO" --endpoint "$COUNTED" >/dev/null
        sb A snapshot delete "v@s$((g - 1))" >/dev/null
        GEN[A]=$g
        stored=$((stored + 1))
    done
    REQ[$at,backup]=$(counted)
    ctl reset >/dev/null
    sb A backup list "$REPO" --endpoint "$COUNTED" >/dev/null
    REQ[$at,list]=$(counted)
    ctl reset >/dev/null
    sb A restore "$REPO" "v@s$g" --as r --endpoint "$COUNTED" >/dev/null
    REQ[$at,restore]=$(counted)
    sb A volume delete r >/dev/null
    # The first full backup: same data at both points, only the repository grew.
    ctl reset >/dev/null
    sb A restore "$REPO" v@s0 --as r --endpoint "$COUNTED" >/dev/null
    REQ[$at,restore0]=$(counted)
    sb A volume delete r >/dev/null
}
echo "phase 1: filling the repository to $BACKUPS backups from 3 pools (1% incrementals of ${SMALL_MIB} MiB)..."
LOW=${LOW:-50}
INCS=${INCS:-6}
while [ $stored -lt "$BACKUPS" ]; do
    if [ $stored -eq $((LOW - INCS)) ]; then measure low; continue; fi
    if [ $stored -eq $((BACKUPS - INCS)) ]; then measure high; continue; fi
    p=$(echo A B C | cut -d' ' -f$((stored % 3 + 1)))
    step "$p" "$DIRECT"
    stored=$((stored + 1))
done
PACKS=$(find "$W/s3/bench/repo/packs" -type f | wc -l)
echo
echo "== repository scale, one run: $BACKUPS backups from 3 pools, $PACKS packs at the end"
printf '%-22s %-30s %-30s %s\n' "job (pool A)" "requests at $LOW backups" "at $BACKUPS backups" "ratio (target <= 1.2)"
printf '%-22s %-30s %-30s\n' "" "total GET PUT LIST DEL HEAD" "total GET PUT LIST DEL HEAD"
for j in backup list restore restore0; do
    lo=${REQ[low,$j]} hi=${REQ[high,$j]}
    printf '%-22s %-30s %-30s %s\n' "$j" "$lo" "$hi" "$(python3 -c "print(f'{${hi%% *}/${lo%% *}:.2f}')")"
done
echo
echo "(backup: $INCS incrementals in a row; restore: the newest backup, its chain longer at the second point; restore0: pool A's first full backup)"
echo "phase 2: memory of full backups and restores..."
# Peak RSS of a job run by the CLI on the pool directly (daemon A stopped), less the RSS
# right after the pool was opened (the CLI reports both with SNAPBLK_MEMORY_REPORT): the
# pool's own open state (RocksDB tables, caches warmed by opening) is not the job's.
# Prints "job store": the job's peak above the open pool, and how much of it the pool's
# store (RocksDB write buffers and block cache: bounded by its configuration) grew by.
direct_rss() {
    if ! SNAPBLK_MEMORY_REPORT=1 "$BIN" "$@" --meta "$W/A/meta" --data "$W/A/data.img" >/dev/null 2>"$W/direct.err"; then
        echo "snapblk $1 failed (free disk: $(df -h --output=avail "$W" | tail -1)):" >&2
        cat "$W/direct.err" >&2
        exit 1
    fi
    sed -n 's/^snapblk memory: \([0-9]*\) KiB resident after opening the pool, peak \([0-9]*\) KiB; store \([0-9]*\) KiB at open, \([0-9]*\) KiB at end$/\1 \2 \3 \4/p' "$W/direct.err" |
        { read -r open peak s0 s1; echo "$((peak - open)) $((s1 - s0))"; }
}
repo_kib() { du -sk "$W/s3/bench/repo" | cut -f1; }
declare -A RSS STORE RUNS BRUNS
FIRST=
for m in $BIG_MIBS; do
    sb A volume create "big$m" --size "${m}M" >/dev/null
    head -c "${m}M" /dev/urandom | nbdcopy - "$(uri A "big$m")"
    sb A snapshot create "big$m@s" >/dev/null
    stop_daemon A
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    # A backup's peak moves 2-3 MiB from run to run (what the allocator keeps resident),
    # as much as the target allows between 4 and 16 GiB: three runs, the median. The
    # first goes into the shared repository; a second run there would upload nothing, so
    # the others each go into a scratch repository of their own, removed after.
    direct_rss backup "big$m@s" --to "$REPO" --endpoint "$DIRECT" >"$W/bk3"
    RSS[$m,repo]=$(repo_kib)
    for k in 2 3; do
        "$BIN" repo init "s3://bench/scratch$k" --endpoint "$DIRECT" >/dev/null
        sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
        direct_rss backup "big$m@s" --to "s3://bench/scratch$k" --endpoint "$DIRECT" >>"$W/bk3"
        rm -rf "$W/s3/bench/scratch$k"
    done
    read -r RSS[$m,backup] STORE[$m,backup] < <(sort -n "$W/bk3" | sed -n 2p)
    BRUNS[$m]=$(cut -d' ' -f1 "$W/bk3" | while read -r k; do echo -n "$((k / 1024)) "; done)
    # A restore can be run again (a backup cannot: its second run uploads nothing): three
    # runs, the median peak (peaks move a few MiB from run to run; the slope per TiB
    # multiplies that by 85 between 4 and 16 GiB).
    : >"$W/rss3"
    for k in 1 2 3; do
        direct_rss restore "$REPO" "big$m@s" --as rb --endpoint "$DIRECT" >>"$W/rss3"
        "$BIN" volume delete rb --meta "$W/A/meta" --data "$W/A/data.img" >/dev/null
    done
    read -r RSS[$m,restore] STORE[$m,restore] < <(sort -n "$W/rss3" | sed -n 2p)
    RUNS[$m]=$(cut -d' ' -f1 "$W/rss3" | while read -r k; do echo -n "$((k / 1024)) "; done)
    start_daemon A
    echo "${m} MiB: backup +$((RSS[$m,backup] / 1024)) MiB (store +$((STORE[$m,backup] / 1024)); median of ${BRUNS[$m]% } MiB), restore +$((RSS[$m,restore] / 1024)) MiB (store +$((STORE[$m,restore] / 1024)); median of ${RUNS[$m]% } MiB), repository $((RSS[$m,repo] / 1024)) MiB"
    if [ -z "$FIRST" ]; then
        FIRST=$m
        # Phase 3 on this one: lazy restore, first read, then a sequential unhydrated read.
        nbdcopy "$(uri A "big$m@s")" "$W/raw.img"
        aws --endpoint-url "$DIRECT" s3 mb s3://raw >/dev/null
        aws --endpoint-url "$DIRECT" s3 cp --quiet "$W/raw.img" s3://raw/raw.img
        rm "$W/raw.img"; sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
        t0=$(date +%s.%N)
        aws --endpoint-url "$DIRECT" s3 cp --quiet s3://raw/raw.img "$W/down.img"
        t1=$(date +%s.%N)
        AWS_MBS=$(python3 -c "print(f'{$m / ($t1 - $t0):.1f}')")
        rm "$W/down.img"; aws --endpoint-url "$DIRECT" s3 rm --quiet s3://raw/raw.img
        # The comparison's 8 GiB of writes are not the restore's to wait for.
        sync
        # One Python process, nbd imported before the clock starts (an interpreter's cold
        # start after drop_caches is not the restore's): the command, then the first 4 KiB
        # read in the middle, then 512 MiB sequential from the second half (unhydrated:
        # the background walk starts at the front).
        read -r T_CMD FIRST_READ SEQ_MBS < <(/usr/bin/python3 -c "
import nbd, subprocess, time
t0 = time.time()
subprocess.run(['$BIN', '--socket', '$W/A/control.sock', 'restore', '$REPO', 'big$m@s', '--as', 'lz', '--lazy', '--endpoint', '$DIRECT'], check=True, stdout=subprocess.DEVNULL)
t_cmd = time.time() - t0
h = nbd.NBD(); h.connect_uri('$(uri A lz)')
h.pread(4096, $(( (m / 2) << 20 )))
first = time.time() - t0
start = $(( (m * 3 / 4) << 20 )); n = min(512 << 20, $((m << 20)) - start)
t = time.time(); off = 0
while off < n:
    h.pread(1 << 20, start + off); off += 1 << 20
print(f'{t_cmd:.2f}', f'{first:.2f}', f'{n / (time.time() - t) / 1048576:.1f}')
")
        for _ in $(seq 2400); do
            st=$(sb A --json restore-status)
            [[ $st == *'"complete": true'* ]] && break; sleep 0.5
        done
        qemu-img compare -q -f raw -F raw "$(uri A "big$m@s")" "$(uri A lz)" || { echo "lazy restore differs!" >&2; exit 1; }
        # (the reader's disconnect reaches the daemon a moment later)
        for _ in $(seq 50); do sb A volume delete lz >/dev/null 2>&1 && break; sleep 0.2; done
        echo "lazy restore of ${FIRST} MiB: first read after ${FIRST_READ} s (target < 1 s; the command itself ${T_CMD} s); sequential unhydrated read ${SEQ_MBS} MB/s vs aws s3 cp ${AWS_MBS} MB/s = $(python3 -c "print(f'{$SEQ_MBS/$AWS_MBS:.2f}')")x (target >= 0.5x)"
        # The daemon's account of what the first read waited for (table copy, chunk index, locating).
        grep -o 'the map of the lazy restore.*' "$W/A/daemon.log" | tail -1 || true
    fi
    sb A volume delete "big$m" --recursive >/dev/null
done

echo
printf '%-10s %-12s %-16s %s\n' "volume" "repo (MiB)" "backup +RSS MiB" "restore +RSS MiB"
for m in $BIG_MIBS; do
    printf '%-10s %-12s %-16s %s\n' "${m} MiB" $((RSS[$m,repo] / 1024)) $((RSS[$m,backup] / 1024)) $((RSS[$m,restore] / 1024))
done
set -- $BIG_MIBS
a=$1; b=${!#}
if [ "$a" != "$b" ]; then
    for j in backup restore; do
        python3 -c "
d = (${RSS[$b,$j]} - ${RSS[$a,$j]}) / 1024
s = (${STORE[$b,$j]} - ${STORE[$a,$j]}) / 1024
r = (${RSS[$b,repo]} - ${RSS[$a,repo]}) / 1024 / 1048576
print(f'$j peak RSS slope: {d:.0f} MiB over {r * 1024:.1f} GiB of repository = {d / r:.0f} MiB per TiB (target <= 256); of it the pool store\'s write buffers and cache (capped by configuration) {s:.0f} MiB; the rest {(d - s) / r:.0f} MiB per TiB')"
    done
fi
