#!/usr/bin/env bash
# NBD over TCP with TLS (STARTTLS, rustls): real libnbd clients (nbdcopy, nbdinfo, the
# Python bindings) with GnuTLS on the other side. Certificates are made here with openssl:
# a CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a second CA
# nobody trusts. Checks: data written over TLS reads back exactly; a plain client is refused
# (TLS required); a client that does not trust the server's CA fails; with
# --tls-client-ca a client without a certificate, or with one from another CA, is refused;
# a non-loopback address is allowed without --insecure only with client certificates
# (--tls-client-ca); bad key files give clear errors.
source "$(dirname "$0")/lib.sh"

C=$T/pki
mkdir -p "$C/client" "$C/wrongca" "$C/noclient"
mkca() { # DIR NAME
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=$2" -keyout "$1/ca-key.pem" -out "$1/ca-cert.pem" 2>/dev/null
}
mkcert() { # CA_DIR OUT_PREFIX CN EXT
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$3" \
        -keyout "$2-key.pem" -out "$2.csr" 2>/dev/null
    printf '%s\n' "$4" >"$2.ext"
    openssl x509 -req -in "$2.csr" -CA "$1/ca-cert.pem" -CAkey "$1/ca-key.pem" -CAcreateserial \
        -days 2 -extfile "$2.ext" -out "$2-cert.pem" 2>/dev/null
}
mkca "$C" "snapblk test CA"
mkca "$C/wrongca" "untrusted CA"
mkcert "$C" "$C/server" "127.0.0.1" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
mkcert "$C" "$C/client/client" "client" "extendedKeyUsage=clientAuth"
# libnbd's tls-certificates directory: ca-cert.pem (+ client-cert.pem, client-key.pem).
cp "$C/ca-cert.pem" "$C/client/ca-cert.pem"
cp "$C/ca-cert.pem" "$C/noclient/ca-cert.pem"
mkcert "$C/wrongca" "$C/wrongca/client" "intruder" "extendedKeyUsage=clientAuth"
# A client that trusts only the untrusted CA (so not the server's certificate).
mkdir -p "$C/distrust" && cp "$C/wrongca/ca-cert.pem" "$C/distrust/ca-cert.pem"
# A client that trusts the server but presents a certificate from the untrusted CA.
cp "$C/ca-cert.pem" "$C/wrongca/ca-cert.pem"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
create_pool 2G

start_tls_daemon() { # extra daemon args...
    "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" \
        --nbd-tcp "127.0.0.1:$PORT" --tls-cert "$C/server-cert.pem" --tls-key "$C/server-key.pem" \
        "$@" >>"$T/daemon.log" 2>&1 &
    DAEMON_PID=$!
    for _ in $(seq 1 200); do
        [ -S "$SNAPBLK_SOCKET" ] && snapblk pool info >/dev/null 2>&1 && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$T/daemon.log" >&2; fail "daemon exited at start"; }
        sleep 0.05
    done
    fail "daemon did not come up"
}
tls_uri() { echo "nbds://127.0.0.1:$PORT/$1?tls-certificates=$2"; }

start_tls_daemon
grep -q "TLS required" "$T/daemon.log" || fail "the daemon does not say TLS is required on TCP"
snapblk volume create v --size 64M >/dev/null
snapblk volume create w --size 64M >/dev/null

log "write 32 MiB over TLS with nbdcopy, read it back over TLS and over the Unix socket"
head -c 32M /dev/urandom >"$T/src"
nbdcopy "$T/src" "$(tls_uri v "$C/noclient")" || fail "nbdcopy over TLS"
nbdcopy "$(tls_uri v "$C/noclient")" "$T/back" || fail "nbdcopy read over TLS"
cmp -n 32M "$T/src" "$T/back" || fail "data read over TLS differs"
nbdcopy "$(uri v)" "$T/back2" || fail "nbdcopy read over the Unix socket"
cmp -n 32M "$T/src" "$T/back2" || fail "data written over TLS differs on the Unix socket"

log "concurrent connections, FUA/flush/zero/trim/block status over TLS (libnbd Python)"
/usr/bin/python3 - "$(tls_uri w "$C/noclient")" <<'PY' || fail "libnbd session over TLS"
import os, sys, threading, nbd
uri = sys.argv[1]
def worker(k, errs):
    try:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.set_uri_allow_local_file(True)
        h.connect_uri(uri)
        assert h.get_tls_negotiated(), "TLS was not negotiated"
        for i in range(64):
            off = (k * 64 + i) * 65536
            data = os.urandom(65536)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 8 == 0 else 0)
            assert h.pread(65536, off) == data, f"mismatch at {off}"
        h.flush()
        h.zero(65536, k * 64 * 65536)
        assert h.pread(65536, k * 64 * 65536) == bytes(65536)
        h.trim(65536, k * 64 * 65536 + 65536)
        seen = []
        h.block_status(1 << 20, 0, lambda ctx, off, ents, err: seen.append(ctx) or 0)
        assert "base:allocation" in seen
        h.shutdown()
    except Exception as e:
        errs.append(f"conn {k}: {e!r}")
errs = []
ts = [threading.Thread(target=worker, args=(k, errs)) for k in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
if errs:
    print("\n".join(errs), file=sys.stderr); sys.exit(1)
PY

log "plain NBD on the TLS port is refused; a client distrusting the server's CA fails"
if nbdinfo "nbd://127.0.0.1:$PORT/v" >"$T/plain.out" 2>&1; then fail "a plain client was served"; fi
grep -qi "tls" "$T/plain.out" || { cat "$T/plain.out" >&2; fail "the refusal does not mention TLS"; }
if nbdinfo "$(tls_uri v "$C/distrust")" >"$T/distrust.out" 2>&1; then fail "a client that does not trust the server connected"; fi
nbdinfo "$(tls_uri v "$C/noclient")" >/dev/null || fail "nbdinfo over TLS"
snapblk pool info >/dev/null || fail "the daemon stopped answering"

log "a client sends close_notify with more bytes behind it: the daemon does not spin"
/usr/bin/python3 - "$PORT" "$C/ca-cert.pem" "$DAEMON_PID" <<'PY' || fail "close_notify followed by data"
import os, socket, ssl, struct, sys, time
port, ca, pid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def cpu():  # utime + stime of the daemon, in clock ticks
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
s = socket.create_connection(("127.0.0.1", port))
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b)); assert c, "server closed"; b += c
    return b
recv(18)                                   # greeting
s.sendall(struct.pack(">I", 3))            # fixed newstyle, no zeroes
s.sendall(struct.pack(">QII", 0x49484156454F5054, 5, 0))  # NBD_OPT_STARTTLS
hdr = recv(20); recv(struct.unpack(">I", hdr[16:20])[0])
assert struct.unpack(">I", hdr[12:16])[0] == 1, "STARTTLS not acknowledged"
ctx = ssl.create_default_context(cafile=ca)
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
o = ctx.wrap_bio(inc, out, server_hostname="127.0.0.1")
while True:
    try:
        o.do_handshake(); break
    except ssl.SSLWantReadError:
        s.sendall(out.read()); inc.write(s.recv(65536))
s.sendall(out.read())
try:
    o.unwrap()
except ssl.SSLWantReadError:
    pass
s.sendall(out.read() + os.urandom(4096))   # close_notify and more, in one write
t0 = cpu(); time.sleep(2); used = cpu() - t0
s.close()
ticks = os.sysconf("SC_CLK_TCK")
assert used < ticks, f"daemon used {used / ticks:.2f} s of CPU in 2 s idle: spinning"
PY
snapblk pool info >/dev/null || fail "the daemon stopped answering after a close_notify with trailing data"

log "mutual TLS: --tls-client-ca requires a client certificate from that CA"
stop_daemon
start_tls_daemon --tls-client-ca "$C/ca-cert.pem"
nbdcopy "$(tls_uri v "$C/client")" "$T/back3" || fail "read with a client certificate"
cmp -n 32M "$T/src" "$T/back3" || fail "data read with a client certificate differs"
if nbdinfo "$(tls_uri v "$C/noclient")" >/dev/null 2>&1; then fail "a client without a certificate was served"; fi
if nbdinfo "$(tls_uri v "$C/wrongca")" >/dev/null 2>&1; then fail "a client certificate from another CA was accepted"; fi
nbdinfo "$(tls_uri v "$C/client")" >/dev/null || fail "the daemon stopped serving after refusals"
stop_daemon

log "a non-loopback address needs client certificates (or --insecure); bad key material is named"
if "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" --nbd-tcp 0.0.0.0:0 \
    --tls-cert "$C/server-cert.pem" --tls-key "$C/server-key.pem" >"$T/noauth.out" 2>&1; then
    fail "TLS without client certificates was allowed on 0.0.0.0"
fi
grep -q "without client authentication.*--tls-client-ca" "$T/noauth.out" || { cat "$T/noauth.out" >&2; fail "unclear error for TLS without client certificates on 0.0.0.0"; }
"$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" --nbd-tcp 0.0.0.0:0 \
    --tls-cert "$C/server-cert.pem" --tls-key "$C/server-key.pem" --tls-client-ca "$C/ca-cert.pem" \
    >>"$T/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 200); do snapblk pool info >/dev/null 2>&1 && break; kill -0 $DAEMON_PID || fail "daemon with mutual TLS on 0.0.0.0 exited"; sleep 0.05; done
snapblk pool info >/dev/null || fail "daemon with mutual TLS on 0.0.0.0 did not come up"
stop_daemon
bad() { # PATTERN ARGS...
    local pat=$1; shift
    if "$SNAPBLK_BIN" daemon --meta "$META" --data "$DATA" --nbd-socket "$NBD_SOCK" \
        --nbd-tcp "127.0.0.1:$PORT" "$@" >"$T/bad.out" 2>&1; then fail "daemon started with $*"; fi
    grep -Eq "$pat" "$T/bad.out" || { cat "$T/bad.out" >&2; fail "no clear error for $*"; }
}
bad "server-key.pem|no PEM|certificate" --tls-cert "$C/server-key.pem" --tls-key "$C/server-key.pem"
bad "nothing.pem" --tls-cert "$C/server-cert.pem" --tls-key "$T/nothing.pem"
bad "certificate and key" --tls-cert "$C/server-cert.pem" --tls-key "$C/client/client-key.pem"
bad "tls-key|tls_key" --tls-cert "$C/server-cert.pem"
start_daemon
assert_check_clean
log "nbd_tls: ok"
