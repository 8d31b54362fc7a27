#!/usr/bin/env python3
"""A fault-injecting HTTP/1.1 proxy for S3 on loopback (Python 3 standard library only).

    s3_fault_proxy.py serve --upstream 127.0.0.1:PORT --ready FILE [--stats FILE] [--port N]
    s3_fault_proxy.py ctl CONTROL_PORT COMMAND...

`serve` listens on 127.0.0.1 (--port, default: any free port) and forwards every request
byte for byte to the upstream S3 server: the request head is passed on unchanged (Host
included, so SigV4 signatures still check), then the body, then the response. It parses
each request head on a keep-alive connection (Content-Length and chunked bodies, aws-chunked
inside either, Expect: 100-continue) so it can decide per request. Once both ports listen it
writes {"port": P, "control": C} to the --ready file.

The control port takes one command per connection (one line) and answers one JSON line
after the change is in force, so a request whose head arrives after the answer sees it:

    mode MODE [count=K] [skip=N] [method=M] [path=SUBSTRING] [rate=KIB_PER_S] [cut]
    stats            counters: requests, req_GET/PUT/LIST/HEAD/DELETE/POST, faults (also
                     written to --stats after every change)
    cut              close every open connection now (in-flight transfers included)
    reset            zero the counters

A rule applies to requests matching `method` and `path` (a substring of the path, query
excluded); other requests pass. `skip=N` lets the first N matching requests pass; `count=K`
faults K matching requests, then the proxy reverts to `pass` (no count: until changed).
`cut` also closes every open connection once the rule is in force (in-flight transfers
fail; the next requests see the new rule).

Modes:

    pass      forward
    500       answer 500 InternalError (S3 XML error body) without forwarding
    503       answer 503 SlowDown without forwarding
    throttle  forward, both directions paced to `rate` KiB/s (one budget shared by all
              connections); a throttled transfer speeds up once the mode is `pass` and
              otherwise keeps its pace until it ends or is cut
    timeout   read the request, never answer (the connection stays open until the client
              gives up)
    drop      a request with a body: forward the head and half the body (8 KiB of a chunked
              body), then close both connections; a GET: forward it, then cut the response
              after its head and half its body; anything else: forward it and close before
              the response
    lose      forward the whole request, close before the response (the server did it; the
              client cannot know)

`ctl` sends one command and prints the answer; it exits 1 if the proxy refused it.
Every request is logged to stderr with the decision; S3_FAULT_PROXY_VERBOSE=1 adds its head.
"""
import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
import time

MODES = ("pass", "500", "503", "throttle", "timeout", "drop", "lose")
PIECE = 64 << 10
VERBOSE = bool(os.environ.get("S3_FAULT_PROXY_VERBOSE"))


class Closed(Exception):
    """The peer closed the connection."""


class Conn:
    """A socket with a read buffer."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self):
        d = self.sock.recv(PIECE)
        if not d:
            raise Closed()
        self.buf += d

    def read_until(self, sep, limit):
        """Bytes up to and including `sep`; None on a clean EOF before any byte."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise ValueError("line or head too long")
            start = max(0, len(self.buf) - len(sep) + 1)
            try:
                self._fill()
            except Closed:
                if not self.buf:
                    return None
                raise

    def read_line(self):
        line = self.read_until(b"\r\n", 8192)
        if line is None:
            raise Closed()
        return line

    def read_some(self, n):
        if not self.buf:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def readable_eof(self):
        """Whether an idle connection was closed by the peer (or has stray bytes)."""
        if self.buf:
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        if not r:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def parse_head(head):
    lines = head.split(b"\r\n")
    first = lines[0].decode("latin-1").split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, headers


def request_framing(headers):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ("chunked", None)
    return ("length", int(headers.get("content-length", "0") or 0))


def response_framing(method, status, headers):
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return ("length", 0)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return ("chunked", None)
    if "content-length" in headers:
        return ("length", int(headers["content-length"]))
    return ("eof", None)


def body_pieces(conn, framing):
    """The raw bytes of a body (chunk framing included), piece by piece."""
    kind, n = framing
    if kind == "length":
        left = n
        while left > 0:
            d = conn.read_some(min(left, PIECE))
            left -= len(d)
            yield d
    elif kind == "chunked":
        while True:
            line = conn.read_line()
            yield line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = conn.read_line()
                    yield t
                    if t == b"\r\n":
                        return
            left = size + 2
            while left > 0:
                d = conn.read_some(min(left, PIECE))
                left -= len(d)
                yield d
    else:
        while True:
            try:
                d = conn.read_some(PIECE)
            except Closed:
                return
            yield d


class Proxy:
    def __init__(self, upstream, stats_path):
        self.upstream = upstream
        self.stats_path = stats_path
        self.lock = threading.Lock()
        self.rule = {"mode": "pass"}
        self.stats = {}
        self.active = set()
        self.pace_next = 0.0
        self.seq = 0

    # --- counters -----------------------------------------------------------------
    def bump(self, key, n=1):
        with self.lock:
            self.stats[key] = self.stats.get(key, 0) + n
            if key.startswith("fault_"):
                self.stats["faults"] = self.stats.get("faults", 0) + n
            self._save()

    def _save(self):
        if not self.stats_path:
            return
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(self.stats, rule=self.rule), f)
        os.replace(tmp, self.stats_path)

    # --- rules --------------------------------------------------------------------
    def decide(self, method, path):
        with self.lock:
            self.seq += 1
            self.stats["requests"] = self.stats.get("requests", 0) + 1
            r = self.rule
            mode = r["mode"]
            if mode == "pass":
                return "pass", self.seq, None
            if r.get("method") and r["method"] != method:
                return "pass", self.seq, None
            if r.get("path") and r["path"] not in path:
                return "pass", self.seq, None
            if r.get("skip", 0) > 0:
                r["skip"] -= 1
                return "pass", self.seq, None
            if r.get("count") is not None:
                r["count"] -= 1
                if r["count"] <= 0:
                    self.rule = {"mode": "pass"}
            self._save()
            return mode, self.seq, r.get("rate")

    def throttling(self, rate):
        """The pace for a throttled transfer now: the current rate while throttling, full
        speed (None) once the mode is `pass`, else the rate it had."""
        with self.lock:
            r = self.rule
            if r["mode"] == "throttle":
                return r["rate"]
            return None if r["mode"] == "pass" else rate

    def pace(self, n, rate):
        with self.lock:
            now = time.monotonic()
            start = max(now, self.pace_next)
            self.pace_next = start + n / rate
            wait = self.pace_next - now
        if wait > 0:
            time.sleep(wait)

    def send(self, sock, data, tr):
        """Sends `data`; with `tr` (a throttled request's {"rate": bytes/s}), paced."""
        if tr is None or tr["rate"] is None:
            sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            tr["rate"] = self.throttling(tr["rate"])
            if tr["rate"] is None:  # back to pass: full speed from here on
                sock.sendall(view)
                return
            step = min(max(1024, tr["rate"] // 10), 16 << 10, len(view))
            self.pace(step, tr["rate"])
            sock.sendall(view[:step])
            self.bump("throttled_bytes", step)
            view = view[step:]

    # --- control ------------------------------------------------------------------
    def command(self, line):
        words = line.split()
        if not words:
            return {"ok": False, "error": "empty command"}
        if words[0] == "stats":
            with self.lock:
                return dict(self.stats, ok=True, rule=dict(self.rule))
        if words[0] == "reset":
            with self.lock:
                self.stats = {}
                self._save()
            return {"ok": True}
        if words[0] == "cut":
            return {"ok": True, "cut": self.cut()}
        if words[0] == "mode" and len(words) >= 2 and words[1] in MODES:
            rule = {"mode": words[1]}
            cut = False
            for w in words[2:]:
                k, _, v = w.partition("=")
                if w == "cut":
                    cut = True
                    continue
                if k in ("count", "skip", "rate"):
                    try:
                        rule[k] = int(v)
                    except ValueError:
                        return {"ok": False, "error": f"{k}={v!r} is not a number"}
                elif k in ("method", "path"):
                    rule[k] = v
                else:
                    return {"ok": False, "error": f"unknown option {w!r}"}
            if rule["mode"] == "throttle":
                if rule.get("rate", 0) <= 0:
                    return {"ok": False, "error": "throttle needs rate=KIB_PER_S"}
                rule["rate"] *= 1024
            if rule.get("count") is not None and rule["count"] <= 0:
                return {"ok": False, "error": "count must be positive"}
            with self.lock:
                self.rule = rule
                self._save()
            reply = {"ok": True, "rule": dict(rule)}
            if cut:
                reply["cut"] = self.cut()
            return reply
        return {"ok": False, "error": f"unknown command {line.strip()!r}"}

    def cut(self):
        """Closes every open connection (both sides); returns how many."""
        with self.lock:
            socks = list(self.active)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.bump("cut", len(socks))
        return len(socks)

    def control_client(self, sock):
        with sock:
            f = sock.makefile("rwb")
            line = f.readline().decode("utf-8", "replace")
            reply = self.command(line)
            f.write((json.dumps(reply) + "\n").encode())
            f.flush()

    # --- proxying -----------------------------------------------------------------
    def track(self, sock):
        with self.lock:
            self.active.add(sock)

    def untrack(self, sock):
        with self.lock:
            self.active.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    def connect_upstream(self):
        s = socket.create_connection(self.upstream, 10)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.track(s)
        return Conn(s)

    def error_response(self, code, method, seq, close):
        name, reason, msg = {
            "500": ("InternalError", "Internal Server Error",
                    "We encountered an internal error. Please try again."),
            "503": ("SlowDown", "Slow Down", "Please reduce your request rate."),
        }[code]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{name}</Code><Message>{msg} (injected by s3_fault_proxy)</Message>"
            f"<RequestId>fault-{seq}</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: fault-{seq}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        ).encode()
        return head if method == "HEAD" else head + body

    def handle(self, csock):
        csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.track(csock)
        self.bump("connections")
        c = Conn(csock)
        up = None
        try:
            while True:
                head = c.read_until(b"\r\n\r\n", 64 << 10)
                if head is None:
                    return
                (method, target, *_), headers = parse_head(head)
                path = target.split("?", 1)[0]
                action, seq, rate = self.decide(method, path)
                # LIST: a GET of the bucket itself (ListObjectsV2), counted apart.
                list_ = method == "GET" and "/" not in path.strip("/")
                self.bump("req_" + ("LIST" if list_ else method))
                log(f"#{seq} {method} {target[:120]} -> {action}")
                if VERBOSE:
                    log(head.decode("latin-1").strip())
                framing = request_framing(headers)
                has_body = framing[0] == "chunked" or framing[1] > 0
                expect = headers.get("expect", "").lower() == "100-continue"

                if action in ("500", "503"):
                    self.bump("fault_" + action)
                    if expect:  # never read the body: answer and close
                        csock.sendall(self.error_response(action, method, seq, True))
                        return
                    for _ in body_pieces(c, framing):
                        pass
                    csock.sendall(self.error_response(action, method, seq, False))
                    continue

                if action == "timeout":
                    self.bump("fault_timeout")
                    if not expect:
                        for _ in body_pieces(c, framing):
                            pass
                    while True:  # never answer; wait for the client to give up
                        c.read_some(PIECE)

                if up is not None and up.readable_eof():
                    self.untrack(up.sock)
                    up = None
                if up is None:
                    up = self.connect_upstream()
                throttled = None
                if action == "throttle":
                    throttled = {"rate": rate}
                    self.bump("throttled_requests")
                self.send(up.sock, head, throttled)

                if expect:
                    rhead = up.read_until(b"\r\n\r\n", 64 << 10)
                    if rhead is None:
                        raise Closed()
                    (_, st, *_), _ = parse_head(rhead)
                    csock.sendall(rhead)
                    if int(st) != 100:  # a final answer instead of 100 Continue
                        return

                if action == "drop" and has_body:
                    limit = framing[1] // 2 if framing[0] == "length" else 8192
                    sent = 0
                    for piece in body_pieces(c, framing):
                        piece = piece[: limit - sent]
                        up.sock.sendall(piece)
                        sent += len(piece)
                        if sent >= limit:
                            break
                    self.bump("fault_drop_put")
                    log(f"#{seq} cut after {sent} body bytes")
                    time.sleep(0.05)  # let the partial body reach the server first
                    return

                for piece in body_pieces(c, framing):
                    self.send(up.sock, piece, throttled)

                if action == "lose" or (action == "drop" and method != "GET"):
                    self.bump("fault_lose" if action == "lose" else "fault_drop_other")
                    # Wait for the server's answer (so it did the work), then close.
                    up.read_until(b"\r\n\r\n", 64 << 10)
                    return

                while True:
                    rhead = up.read_until(b"\r\n\r\n", 64 << 10)
                    if rhead is None:
                        raise Closed()
                    (_, st, *_), rheaders = parse_head(rhead)
                    status = int(st)
                    if 100 <= status < 200 and status != 101:
                        csock.sendall(rhead)
                        continue
                    break
                rframing = response_framing(method, status, rheaders)

                if action == "drop":  # a GET: cut the response midway
                    self.bump("fault_drop_get")
                    if rframing[0] == "length" and rframing[1] == 0:
                        log(f"#{seq} closed before an empty response")
                        return
                    csock.sendall(rhead)
                    limit = rframing[1] // 2 if rframing[0] == "length" else 8192
                    sent = 0
                    for piece in body_pieces(up, rframing):
                        piece = piece[: limit - sent]
                        csock.sendall(piece)
                        sent += len(piece)
                        if sent >= limit:
                            break
                    log(f"#{seq} cut the response after {sent} body bytes")
                    return

                self.send(csock, rhead, throttled)
                for piece in body_pieces(up, rframing):
                    self.send(csock, piece, throttled)
                self.bump("forwarded")
                close = rframing[0] == "eof" or any(
                    "close" in h.get("connection", "").lower() for h in (headers, rheaders)
                )
                if close:
                    return
        except (Closed, OSError, ValueError) as e:
            if not isinstance(e, Closed):
                log(f"connection ended: {e!r}")
        finally:
            if up is not None:
                self.untrack(up.sock)
            self.untrack(csock)


def log(msg):
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] proxy: {msg}\n")
    sys.stderr.flush()


def serve(args):
    host, _, port = args.upstream.rpartition(":")
    proxy = Proxy((host, int(port)), args.stats)
    proxy.command("reset")
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(128)
    csock = socket.socket()
    csock.bind(("127.0.0.1", 0))
    csock.listen(16)

    def accept_loop(ls, fn):
        while True:
            s, _ = ls.accept()
            threading.Thread(target=fn, args=(s,), daemon=True).start()

    threading.Thread(target=accept_loop, args=(csock, proxy.control_client), daemon=True).start()
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"port": lsock.getsockname()[1], "control": csock.getsockname()[1]}, f)
    os.replace(tmp, args.ready)
    log(f"listening on {lsock.getsockname()[1]} (control {csock.getsockname()[1]}), upstream {args.upstream}")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    accept_loop(lsock, proxy.handle)


def ctl(args):
    with socket.create_connection(("127.0.0.1", args.control_port), 10) as s:
        s.sendall((" ".join(args.command) + "\n").encode())
        f = s.makefile("rb")
        reply = f.readline().decode()
    print(reply.strip())
    try:
        return 0 if json.loads(reply).get("ok") else 1
    except ValueError:
        return 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server")
    s.add_argument("--ready", required=True, help='file to write {"port", "control"} to')
    s.add_argument("--stats", help="file the counters are written to after every change")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("ctl")
    c.add_argument("control_port", type=int)
    c.add_argument("command", nargs="+")
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
    else:
        sys.exit(ctl(args))


if __name__ == "__main__":
    main()
