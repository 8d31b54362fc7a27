#!/usr/bin/python3
"""Floods an NBD Unix socket while busy clients work, against a daemon started with
--max-connections CAP. Usage: nbd_flood.py SOCKET EXPORT CAP

1. CAP/2 busy libnbd clients write and read back their own blocks in threads, all along.
2. 3*CAP raw idle connections are opened: exactly the CAP - CAP/2 free places get the
   server's greeting; every other one is closed at once by the server.
3. While the flood holds its places, the busy clients keep completing requests, and a new
   client is refused.
4. The flood closes; a new client is served again within a few seconds.
Prints a summary; exits 1 on any failure."""
import os
import socket
import sys
import threading
import time

import nbd

sock, export, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
busy_n = cap // 2
stop = threading.Event()
done = [0] * busy_n
errors = []


def busy(i):
    try:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
        off = i * (1 << 20)
        while not stop.is_set():
            data = os.urandom(65536)
            h.pwrite(data, off)
            if h.pread(65536, off) != data:
                errors.append(f"client {i}: data read back differs")
                return
            done[i] += 1
        h.shutdown()
    except Exception as e:  # noqa: BLE001 - report any failure of a busy client
        errors.append(f"busy client {i}: {e}")


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


threads = [threading.Thread(target=busy, args=(i,)) for i in range(busy_n)]
for t in threads:
    t.start()
for _ in range(100):
    if all(d > 0 for d in done):
        break
    time.sleep(0.05)
if not all(d > 0 for d in done):
    fail(f"busy clients did not start: {done} {errors}")

idle, admitted, refused = [], 0, 0
for _ in range(3 * cap):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.settimeout(5)
    try:
        got = s.recv(18)
    except socket.timeout:
        got = None
    if got:
        admitted += 1
        idle.append(s)
    else:
        refused += 1
        s.close()
print(f"flood: {admitted} idle connections admitted, {refused} refused")
if admitted != cap - busy_n:
    fail(f"{admitted} idle connections admitted with {busy_n} busy and a cap of {cap}")

before = list(done)
time.sleep(1.0)
if not all(a > b for a, b in zip(done, before)):
    fail(f"busy clients stalled during the flood: {before} -> {done} {errors}")
try:
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    fail("a client over the cap was served")
except nbd.Error:
    pass

for s in idle:
    s.close()
served = False
for _ in range(100):
    try:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
        h.pread(4096, 0)
        h.shutdown()
        served = True
        break
    except nbd.Error:
        time.sleep(0.05)
stop.set()
for t in threads:
    t.join()
if errors:
    fail("; ".join(errors))
if not served:
    fail("no new client was served after the flood ended")
print(f"busy clients completed {sum(done)} write+read pairs; a new client was served after the flood")
