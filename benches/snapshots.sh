#!/usr/bin/env bash
# Issue 10's worst cases in one run, printed as ratios (absolute numbers drift on a shared VM):
#  A. 4K randread / randwrite QD32 on a 1 GiB volume filled once, at 0, 10, 50 and 200
#     retained snapshots with ~1% random churn before each (the volume is never rewritten;
#     randwrite stays inside its first 64 MiB so reads keep seeing the history); reads of the
#     oldest snapshot and of a clone of it at 200, also paired: alternating twice with a
#     volume filled alike that never had snapshots (the oldest snapshot's content is the
#     fill), so the machine's drift between jobs minutes apart cancels.
#  B. deleting the oldest snapshot of a fully written 2 GiB vs 8 GiB volume (same churn).
#  C. p99 write latency of fio 4K randwrite with and without 100 rounds of rolling retention
#     (create the newest snapshot, delete the oldest), and while diff, pool check, pool scrub
#     run.
#  D. daemon start to serving with 1 GiB and with 8 GiB of 4K random writes in the pool;
#     snapshot create latency after each.
#  E. metadata bytes per data byte after sequential and after 4K random writes: once the
#     store holds only live entries (`pool compact`), and as the table files are right after
#     the writes (old page versions wait for RocksDB's own compactions).
#  F. A's reads at a larger size: a BIG_GIB volume filled once, 50 snapshots with ~1%
#     churn before each: 4K randread QD32 of the volume, its oldest snapshot and a clone of
#     it (a map spread over more table files than A's, most of it out of the memtable).
#  G. A's live reads, paired: two 1 GiB volumes filled once and churned alike (~1% random 4K
#     writes per round); one takes a snapshot before each round, the other never does. At 0,
#     50 and 200 rounds, 4K randread QD32 of each, alternating twice (kept, none, kept,
#     none): ratio kept / none. Same data layout and LSM, only the snapshots differ, so the
#     machine's drift between jobs cancels instead of showing as depth.
#  Each read job first reads its target once sequentially (data then comes from the page
#  cache: the timed reads compare metadata paths, the harshest case for their ratios).
#  A and F read the oldest snapshot and the clone three times: with the daemon's content
#  cache (format2.md §8b, the default), restarted with --snapshot-cache 0 (no RAM tier:
#  every snapshot page from the contents kept on the metadata disk, §8c — a snapshot read
#  larger than the RAM), and with --snapshot-cache-disk 0 too (every page resolved from
#  the map's dead records: a read larger than both, or the first read of a page).
# Usage: benches/snapshots.sh [RUNTIME_S=8] [BIG_GIB=8]   (SECTIONS="A B C D F G" to run a subset)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-8}
BIG=${2:-8}
SECTIONS=${SECTIONS:-A B C D F G}
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/snapblk/target}
BIN=$CARGO_TARGET_DIR/release/snapblk
[ -x "$BIN" ] || cargo build --release --bin snapblk
W=$(mktemp -d /var/tmp/snapblk-bench.XXXXXX)
export SNAPBLK_SOCKET=$W/control.sock
DPID=
# Runs under set -e: no step may fail, or the rest of the cleanup is skipped.
cleanup() { set +e; [ -n "$DPID" ] && kill "$DPID" 2>/dev/null; pkill -f "$W/" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
say() { echo "[$(date +%T)] $*" >&2; }

pool() { # NAME SIZE: a fresh pool and its daemon
    stop
    rm -rf "$W/meta" "$W/data.img" "$W/nbd.sock" "$SNAPBLK_SOCKET"
    "$BIN" pool create --meta "$W/meta" --data "$W/data.img" --size "$2" >/dev/null
    start
}
start() { # [daemon flags...]
    "$BIN" daemon --meta "$W/meta" --data "$W/data.img" --nbd-socket "$W/nbd.sock" --nbd-tcp none "$@" 2>>"$W/daemon.log" &
    DPID=$!
    wait_sock "$W/nbd.sock"; wait_sock "$SNAPBLK_SOCKET"
}
stop() {
    if [ -n "$DPID" ]; then kill "$DPID"; wait "$DPID" 2>/dev/null || true; DPID=; fi
    rm -f "$W/nbd.sock" "$SNAPBLK_SOCKET"
}
uri() { echo "nbd+unix:///$1?socket=$W/nbd.sock"; }
fio_json() { # URI RW BS QD SIZE [extra fio args...]: runs fio, prints its json
    local u=$1 rw=$2 bs=$3 qd=$4 size=$5; shift 5
    fio --name=b --ioengine=nbd --uri="$u" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$size" \
        --group_reporting --output-format=json --output="$W/fio.json" "$@" >/dev/null 2>&1
    cat "$W/fio.json"
}
iops() { python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["write"]["iops"]+j["read"]["iops"]))'; }
p99() { python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["write"]["clat_ns"]["percentile"]; print(int(j["99.000000"]/1000))'; }
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}x' if b else '-')" "$1" "$2"; }
churn() { # VOL MIB_OF_VOLUME PERCENT: random 4K writes over the whole volume
    local n=$(( $2 * 256 * $3 / 100 ))
    fio --name=c --ioengine=nbd --uri="$(uri "$1")" --rw=randwrite --bs=4k --iodepth=16 --size="$2M" \
        --number_ios="$n" --randrepeat=0 >/dev/null 2>&1
}
fill() { fio --name=f --ioengine=nbd --uri="$(uri "$1")" --rw=write --bs=1M --iodepth=8 --size="$2" >/dev/null 2>&1; }

# The daemon's CPU ticks (user + system, its exited threads included) less those of its
# RocksDB background threads (flushes, compactions: they outlive any one job, and a
# compaction after the churn would otherwise be charged to the reads).
cpu_ticks() {
    local all bg=0 t
    all=$(awk '{print $14 + $15}' "/proc/$DPID/stat")
    for t in /proc/"$DPID"/task/*; do
        if [[ $(cat "$t/comm" 2>/dev/null) == rocksdb:* ]]; then
            bg=$((bg + $(awk '{print $14 + $15}' "$t/stat" 2>/dev/null || echo 0)))
        fi
    done
    echo $((all - bg))
}
read_job() { # URI [SIZE=1G]: 4K randread QD32; sets IOPS, and CPU = the daemon's CPU (us) per read
    # serving it (background flushes and compactions not counted). One sequential pass over
    # the target first: the daemon's default data_cache ("reads") reads data through the host
    # page cache, so without it a job would measure how much of its data an earlier job had
    # cached (churn moves blocks to new, uncached offsets). After it every timed read's data
    # is in RAM and what differs between targets and depths is the metadata path alone.
    local c0 c1
    fio_json "$1" read 1M 8 "${2:-1G}" >/dev/null
    c0=$(cpu_ticks)
    IOPS=$(fio_json "$1" randread 4k 32 "${2:-1G}" --time_based --runtime="$RUNTIME" --ramp_time=1 | iops)
    c1=$(cpu_ticks)
    CPU=$(python3 -c "import sys,os; c,i,t=map(float,sys.argv[1:]); print(f'{c*1e6/os.sysconf(\"SC_CLK_TCK\")/(i*t):.0f}')" \
        "$((c1 - c0))" "$IOPS" "$((RUNTIME + 1))")
}
info() { "$BIN" --json "$@" pool info | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["metadata_size"], j["used"], j["reclaim_jobs"])'; }
# Metadata size and data used once the store holds only live entries (`pool compact`, offline).
compacted() { "$BIN" --json --meta "$W/meta" --data "$W/data.img" pool compact | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["metadata_size"], j["used"])'; }

# ---------------------------------------------------------------- A
if on A; then
say "A: 1 GiB volume, reads and writes at 0/10/50/200 snapshots"
pool a 6G
"$BIN" volume create v --size 1G >/dev/null
fill v 1G
# The paired baseline: filled like v, no snapshots, no churn (the content of v@s1).
"$BIN" volume create z --size 1G >/dev/null
fill z 1G
declare -A RR RW RC
snaps=0
for depth in 0 10 50 200; do
    while [ "$snaps" -lt "$depth" ]; do
        snaps=$((snaps + 1))
        "$BIN" snapshot create "v@s$snaps" >/dev/null
        churn v 1024 1
    done
    read_job "$(uri v)"; RR[$depth]=$IOPS; RC[$depth]=$CPU
    RW[$depth]=$(fio_json "$(uri v)" randwrite 4k 32 64M --time_based --runtime="$RUNTIME" --ramp_time=1 | iops)
    say "  depth $depth: randread ${RR[$depth]}, randwrite ${RW[$depth]} IOPS"
done
read_job "$(uri v@s1)"; OLD=$IOPS; OLD_CPU=$CPU
"$BIN" clone v@s1 c >/dev/null
read_job "$(uri c)"; CLONE=$IOPS; CLONE_CPU=$CPU
# Paired: baseline, oldest, clone, twice (means).
PZ=0; PO=0; PC=0
for _ in 1 2; do
    read_job "$(uri z)"; PZ=$((PZ + IOPS / 2))
    read_job "$(uri v@s1)"; PO=$((PO + IOPS / 2))
    read_job "$(uri c)"; PC=$((PC + IOPS / 2))
done
say "  paired: never-snapshotted volume $PZ, oldest snapshot $PO, clone $PC IOPS"
# The same reads with the content cache off (a snapshot read bigger than the cache).
stop; start --snapshot-cache 0
read_job "$(uri v@s1)"; OLD_NC=$IOPS; OLD_NC_CPU=$CPU
read_job "$(uri c)"; CLONE_NC=$IOPS; CLONE_NC_CPU=$CPU
stop; start --snapshot-cache 0 --snapshot-cache-disk 0
read_job "$(uri v@s1)"; OLD_NONE=$IOPS; OLD_NONE_CPU=$CPU
read_job "$(uri c)"; CLONE_NONE=$IOPS; CLONE_NONE_CPU=$CPU
say "  oldest snapshot read $OLD, clone of it $CLONE IOPS; no RAM tier $OLD_NC, $CLONE_NC; no cache $OLD_NONE, $CLONE_NONE"
fi

# ---------------------------------------------------------------- B
if on B; then
say "B: oldest-snapshot delete, 2 GiB vs ${BIG} GiB volume, same churn (20 MiB per snapshot)"
declare -A DEL
for gib in 2 "$BIG"; do
    pool b "$((gib * 2 + 2))G"
    "$BIN" volume create v --size "${gib}G" >/dev/null
    fill v "${gib}G"
    for i in 1 2 3; do
        "$BIN" snapshot create "v@s$i" >/dev/null
        fio --name=c --ioengine=nbd --uri="$(uri v)" --rw=randwrite --bs=4k --iodepth=16 --size="${gib}G" \
            --number_ios=5120 >/dev/null 2>&1
    done
    sleep 2
    # The daemon reclaims in the background: time the delete until no job is left.
    t0=$(date +%s%N)
    "$BIN" snapshot delete v@s1 >/dev/null
    while [ "$(info | cut -d' ' -f3)" != 0 ]; do sleep 0.01; done
    DEL[$gib]=$(( ($(date +%s%N) - t0) / 1000000 ))
    say "  ${gib} GiB: delete + reclaim ${DEL[$gib]} ms"
done
fi

# ---------------------------------------------------------------- C
if on C; then
say "C: p99 of 4K randwrite QD32 alone, and with retention / diff / check / scrub running"
pool c 8G
"$BIN" volume create v --size 2G >/dev/null
fill v 2G
for i in $(seq 1 10); do "$BIN" snapshot create "v@r$i" >/dev/null; churn v 2048 1; done
lat() { fio_json "$(uri v)" randwrite 4k 32 2G --time_based --runtime="$1" --lat_percentiles=1 | p99; }
BASE=$(lat 20)
lat 25 >"$W/ret.p99" & F=$!
sleep 2; r=10
while kill -0 "$F" 2>/dev/null && [ "$r" -lt 110 ]; do
    r=$((r + 1)); "$BIN" snapshot create "v@r$r" >/dev/null; "$BIN" snapshot delete "v@r$((r - 10))" >/dev/null
done
wait "$F"; RET=$(cat "$W/ret.p99"); ROUNDS=$((r - 10))
declare -A BG
for what in diff check scrub; do
    lat 15 >"$W/bg.p99" & F=$!
    sleep 2
    while kill -0 "$F" 2>/dev/null; do
        case $what in
            diff) "$BIN" diff "v@r$((r - 9))" "v@r$r" >/dev/null ;;
            check) "$BIN" pool check >/dev/null ;;
            scrub) "$BIN" pool scrub >/dev/null ;;
        esac
    done
    wait "$F"; BG[$what]=$(cat "$W/bg.p99")
done
say "  p99 alone ${BASE} us; retention ($ROUNDS rounds) ${RET}; diff ${BG[diff]}; check ${BG[check]}; scrub ${BG[scrub]}"
fi

# ---------------------------------------------------------------- D, E
if on D; then
say "D/E: start time and metadata size after 1 GiB and ${BIG} GiB of 4K random writes"
declare -A START SNAP META METAC
for gib in 1 "$BIG"; do
    pool d "$((gib + 2))G"
    "$BIN" volume create v --size "${gib}G" >/dev/null
    fio --name=r --ioengine=nbd --uri="$(uri v)" --rw=randwrite --bs=4k --iodepth=32 --size="${gib}G" \
        --randrepeat=0 >/dev/null 2>&1
    SNAP[$gib]=$("$BIN" --json snapshot create v@s | python3 -c 'import json,sys; print(json.load(sys.stdin)["create_micros"])')
    stop
    META[$gib]=$(info --meta "$W/meta" --data "$W/data.img" | cut -d' ' -f1,2)
    t0=$(date +%s%N); start; "$BIN" volume list >/dev/null
    START[$gib]=$(( ($(date +%s%N) - t0) / 1000000 ))
    stop
    METAC[$gib]=$(compacted)
    say "  ${gib} GiB: start ${START[$gib]} ms, snapshot ${SNAP[$gib]} us, metadata/used ${META[$gib]}, compacted ${METAC[$gib]}"
done
pool e 3G
"$BIN" volume create v --size 1G >/dev/null
fill v 1G
# Checksum consolidation (format2.md §9b) runs behind the writes: let it finish.
sleep 3
stop
SEQ=$(info --meta "$W/meta" --data "$W/data.img" | cut -d' ' -f1,2)
SEQC=$(compacted)
fi

# ---------------------------------------------------------------- F
if on F; then
say "F: ${BIG} GiB volume, reads of the volume, its oldest snapshot and a clone at 50 snapshots"
pool f "$((BIG * 2 + 2))G"
"$BIN" volume create v --size "${BIG}G" >/dev/null
fill v "${BIG}G"
for i in $(seq 1 50); do "$BIN" snapshot create "v@s$i" >/dev/null; churn v "$((BIG * 1024))" 1; done
read_job "$(uri v)" "${BIG}G"; F_LIVE=$IOPS; F_LIVE_CPU=$CPU
read_job "$(uri v@s1)" "${BIG}G"; F_OLD=$IOPS; F_OLD_CPU=$CPU
"$BIN" clone v@s1 c >/dev/null
read_job "$(uri c)" "${BIG}G"; F_CLONE=$IOPS; F_CLONE_CPU=$CPU
stop; start --snapshot-cache 0
read_job "$(uri v@s1)" "${BIG}G"; F_OLD_NC=$IOPS; F_OLD_NC_CPU=$CPU
read_job "$(uri c)" "${BIG}G"; F_CLONE_NC=$IOPS; F_CLONE_NC_CPU=$CPU
stop; start --snapshot-cache 0 --snapshot-cache-disk 0
read_job "$(uri v@s1)" "${BIG}G"; F_OLD_NONE=$IOPS; F_OLD_NONE_CPU=$CPU
read_job "$(uri c)" "${BIG}G"; F_CLONE_NONE=$IOPS; F_CLONE_NONE_CPU=$CPU
say "  live $F_LIVE, oldest snapshot $F_OLD, clone $F_CLONE IOPS; no RAM tier $F_OLD_NC, $F_CLONE_NC; no cache $F_OLD_NONE, $F_CLONE_NONE"
fi

# ---------------------------------------------------------------- G
if on G; then
say "G: live reads of two 1 GiB volumes churned alike, one keeping a snapshot per round"
pool g 8G
for v in kept none; do "$BIN" volume create "$v" --size 1G >/dev/null; fill "$v" 1G; done
declare -A GK GN GKC GNC
rounds=0
for depth in 0 50 200; do
    while [ "$rounds" -lt "$depth" ]; do
        rounds=$((rounds + 1))
        "$BIN" snapshot create "kept@s$rounds" >/dev/null
        churn kept 1024 1
        churn none 1024 1
    done
    GK[$depth]=0; GN[$depth]=0; GKC[$depth]=0; GNC[$depth]=0
    for _ in 1 2; do
        read_job "$(uri kept)"; GK[$depth]=$((GK[$depth] + IOPS / 2)); GKC[$depth]=$((GKC[$depth] + CPU))
        read_job "$(uri none)"; GN[$depth]=$((GN[$depth] + IOPS / 2)); GNC[$depth]=$((GNC[$depth] + CPU))
    done
    GKC[$depth]=$((GKC[$depth] / 2)); GNC[$depth]=$((GNC[$depth] / 2))
    say "  $depth rounds: kept ${GK[$depth]}, none ${GN[$depth]} IOPS"
done
fi

# ---------------------------------------------------------------- report
pct() { python3 -c "import sys; m,u=map(float,sys.argv[1:3]); print(f'{100*m/u:.3f}%')" $1; }
echo
if on A; then
echo "A. 4K QD32 IOPS on a 1 GiB volume (ratio to 0 snapshots)"
printf "%-10s %10s %8s %10s %8s %14s\n" snapshots randread ratio randwrite ratio "daemon us/read"
for d in 0 10 50 200; do
    printf "%-10s %10s %8s %10s %8s %14s\n" "$d" "${RR[$d]}" "$(ratio "${RR[$d]}" "${RR[0]}")" "${RW[$d]}" "$(ratio "${RW[$d]}" "${RW[0]}")" "${RC[$d]}"
done
echo "oldest snapshot read: $OLD ($(ratio "$OLD" "${RR[0]}")), daemon $OLD_CPU us/read; clone of it: $CLONE ($(ratio "$CLONE" "${RR[0]}")), $CLONE_CPU us/read"
echo "  paired with a volume filled alike, never snapshotted (mean of 2 alternating jobs): $PZ; oldest snapshot $PO ($(ratio "$PO" "$PZ")), clone $PC ($(ratio "$PC" "$PZ"))"
echo "  no RAM tier (kept on disk): oldest snapshot $OLD_NC ($(ratio "$OLD_NC" "${RR[0]}")), $OLD_NC_CPU us/read; clone $CLONE_NC ($(ratio "$CLONE_NC" "${RR[0]}")), $CLONE_NC_CPU us/read"
echo "  no content cache at all: oldest snapshot $OLD_NONE ($(ratio "$OLD_NONE" "${RR[0]}")), $OLD_NONE_CPU us/read; clone $CLONE_NONE ($(ratio "$CLONE_NONE" "${RR[0]}")), $CLONE_NONE_CPU us/read"
echo
fi
on B && { echo "B. oldest-snapshot delete + reclaim: 2 GiB ${DEL[2]} ms, ${BIG} GiB ${DEL[$BIG]} ms, ratio $(ratio "${DEL[$BIG]}" "${DEL[2]}")"; echo; }
on C && { echo "C. 4K randwrite QD32 p99 (us): alone $BASE; rolling retention ($ROUNDS rounds) $RET ($(ratio "$RET" "$BASE")); diff ${BG[diff]} ($(ratio "${BG[diff]}" "$BASE")); check ${BG[check]} ($(ratio "${BG[check]}" "$BASE")); scrub ${BG[scrub]} ($(ratio "${BG[scrub]}" "$BASE"))"; echo; }
if on D; then
echo "D. daemon start to serving: 1 GiB ${START[1]} ms, ${BIG} GiB ${START[$BIG]} ms, ratio $(ratio "${START[$BIG]}" "${START[1]}"); snapshot create after them: ${SNAP[1]} us, ${SNAP[$BIG]} us"
echo
echo "E. metadata / data, live entries (after pool compact): sequential 1 GiB $(pct "$SEQC"); 4K random 1 GiB $(pct "${METAC[1]}"); 4K random ${BIG} GiB $(pct "${METAC[$BIG]}")"
echo "   table files right after the writes (old versions not compacted yet): $(pct "$SEQ"); $(pct "${META[1]}"); $(pct "${META[$BIG]}")"
fi
if on F; then
echo
echo "F. 4K randread QD32 on a ${BIG} GiB volume at 50 snapshots: live $F_LIVE ($F_LIVE_CPU us/read of daemon CPU); oldest snapshot $F_OLD ($(ratio "$F_OLD" "$F_LIVE"), $F_OLD_CPU us/read); clone of it $F_CLONE ($(ratio "$F_CLONE" "$F_LIVE"), $F_CLONE_CPU us/read)"
echo "   no RAM tier (kept on disk): oldest snapshot $F_OLD_NC ($(ratio "$F_OLD_NC" "$F_LIVE"), $F_OLD_NC_CPU us/read); clone $F_CLONE_NC ($(ratio "$F_CLONE_NC" "$F_LIVE"), $F_CLONE_NC_CPU us/read)"
echo "   no content cache at all: oldest snapshot $F_OLD_NONE ($(ratio "$F_OLD_NONE" "$F_LIVE"), $F_OLD_NONE_CPU us/read); clone $F_CLONE_NONE ($(ratio "$F_CLONE_NONE" "$F_LIVE"), $F_CLONE_NONE_CPU us/read)"
fi
if on G; then
echo
echo "G. 4K randread QD32, 1 GiB volumes churned alike: with a snapshot kept per round vs none (mean of 2 alternating jobs each)"
printf "%-8s %12s %12s %8s %16s\n" rounds kept none ratio "us/read kept/none"
for d in 0 50 200; do
    printf "%-8s %12s %12s %8s %16s\n" "$d" "${GK[$d]}" "${GN[$d]}" "$(ratio "${GK[$d]}" "${GN[$d]}")" "${GKC[$d]}/${GNC[$d]}"
done
fi
