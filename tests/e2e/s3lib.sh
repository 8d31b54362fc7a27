# A real S3-compatible server for the backup tests: s3s-fs (crates.io, checks SigV4
# signatures) on 127.0.0.1, installed by scripts/setup.sh. Source after lib.sh.
S3S_FS=${S3S_FS:-/var/cache/snapblk/tools/bin/s3s-fs}
[ -x "$S3S_FS" ] || fail "s3s-fs not found at $S3S_FS (run scripts/setup.sh)"
S3_ROOT=$T/s3root
S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
S3_PID=
export AWS_ACCESS_KEY_ID=snapblk-test AWS_SECRET_ACCESS_KEY=snapblk-test-secret
export AWS_EC2_METADATA_DISABLED=true AWS_REGION=us-east-1
export SNAPBLK_S3_ENDPOINT=http://127.0.0.1:$S3_PORT

start_s3() {
    mkdir -p "$S3_ROOT"
    "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$AWS_ACCESS_KEY_ID" \
        --secret-key "$AWS_SECRET_ACCESS_KEY" "$S3_ROOT" >>"$T/s3.log" 2>&1 &
    S3_PID=$!
    for _ in $(seq 1 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $S3_PORT), 0.2)" 2>/dev/null && return 0
        sleep 0.05
    done
    cat "$T/s3.log" >&2; fail "s3s-fs did not come up"
}

stop_s3() {
    if [ -n "$S3_PID" ]; then
        kill -9 "$S3_PID" 2>/dev/null || true
        wait "$S3_PID" 2>/dev/null || true
    fi
    S3_PID=
}
defer stop_s3

# The fault-injecting proxy (s3_fault_proxy.py) in front of the S3 server: start_proxy
# points SNAPBLK_S3_ENDPOINT at it; fault MODE [count=K] [method=M] [path=P] [rate=KIB]
# [cut] changes what it does (see the proxy's doc).
PROXY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/s3_fault_proxy.py
start_proxy() {
    python3 "$PROXY" serve --upstream "127.0.0.1:$S3_PORT" --ready "$T/proxy.ready" \
        --stats "$T/proxy.stats" >>"$T/proxy.log" 2>&1 &
    PROXY_PID=$!
    defer "kill $PROXY_PID; wait $PROXY_PID"
    for _ in $(seq 1 100); do
        [ -s "$T/proxy.ready" ] && break
        kill -0 "$PROXY_PID" 2>/dev/null || fail "the fault proxy exited at start"
        sleep 0.05
    done
    [ -s "$T/proxy.ready" ] || fail "the fault proxy did not come up"
    PROXY_CTL=$(json_get control <"$T/proxy.ready")
    export SNAPBLK_S3_ENDPOINT=http://127.0.0.1:$(json_get port <"$T/proxy.ready")
}
fault() { python3 "$PROXY" ctl "$PROXY_CTL" mode "$@" >"$T/ctl.out" || fail "proxy refused: $(cat "$T/ctl.out")"; }
