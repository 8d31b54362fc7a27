#!/usr/bin/env python3
"""Plays systemd's side of sd_notify(3): binds a datagram socket (a path, or an abstract
name given as @name) and writes one JSON line per message to OUT, noting whether the
paths to check existed when the message arrived (READY=1 must come after the sockets)."""
import json, os, socket, sys, time

addr, out, checks = sys.argv[1], sys.argv[2], sys.argv[3:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + addr[1:] if addr.startswith("@") else addr)
with open(out, "a", buffering=1) as f:
    while True:
        data = s.recv(65536).decode()
        f.write(json.dumps({"t": time.time(), "msg": data,
                            "present": [os.path.exists(p) for p in checks]}) + "\n")
