#!/usr/bin/env python3
"""Writes the committed seed corpus (fuzz/corpus/<target>/): well-formed inputs that get
each fuzz target past its first parser, so mutations explore the deep paths."""
import json, os, struct, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")

def put(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# --- NBD: client flags, options, requests ---------------------------------------------
IHAVEOPT = 0x49484156454F5054
def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data
def name(n):
    return struct.pack(">I", len(n)) + n
def go(n, infos=(0, 1, 2, 3)):
    return opt(7, name(n) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))
def meta(n, queries):
    q = b"".join(name(x) for x in queries)
    return opt(10, name(n) + struct.pack(">I", len(queries)) + q)
def req(kind, offset=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, offset, length) + payload
flags = struct.pack(">I", 3)
write = req(1, 4096, 8192, payload=bytes(range(256)) * 32)
put("nbd", "go_rw", flags + opt(8) + meta(b"vol", [b"base:allocation"]) + go(b"vol")
    + write + req(0, 0, 16384, cookie=2) + req(3, cookie=3) + req(4, 4096, 4096, cookie=4)
    + req(6, 0, 65536, flags=1, cookie=5) + req(7, 0, 1 << 20, cookie=6) + req(5, 0, 4096, cookie=7)
    + req(1, 0, 4096, flags=1, cookie=8, payload=b"\x5a" * 4096) + req(2))
put("nbd", "snapshot_ro", flags + opt(3) + opt(6, name(b"vol@snap") + struct.pack(">H", 0))
    + go(b"vol@snap") + req(0, 0, 4096) + req(1, 0, 4096, payload=b"x" * 4096) + req(2))
put("nbd", "export_name", flags + opt(1, b"vol") + req(0, 0, 512) + req(2))
put("nbd", "bad_options", flags + opt(99, b"junk") + go(b"nope") + opt(2))

# --- control protocol -------------------------------------------------------------------
cmds = [
    {"cmd": "pool_info"}, {"cmd": "volume_create", "name": "v", "size": 1 << 30},
    {"cmd": "volume_resize", "name": "v", "size": 4096, "force": True},
    {"cmd": "snapshot_create", "snapshot": "v@s"}, {"cmd": "clone", "snapshot": "v@s", "name": "c"},
    {"cmd": "attach", "target": "v", "read_only": False, "queues": 2, "depth": 64},
    {"cmd": "backup", "snapshot": "v@s", "full": False,
     "repo": {"url": "s3://b/p", "endpoint": "http://127.0.0.1:9000", "region": None,
              "secret": "00ff", "credentials": ["id", "key", None], "s3_timeout": 5, "s3_attempts": 2}},
    {"cmd": "restore", "backup": "v@s", "name": "r", "lazy": True,
     "repo": {"url": "file:///tmp/r", "endpoint": None, "region": None, "secret": "aa"}},
]
put("control", "all", "".join(json.dumps(c) + "\n" for c in cmds).encode())
put("control", "bad", b'{"cmd":"volume_create","name":7}\n{"cmd":\n\xff\xfe\n')

# --- repository objects: selector byte + body ------------------------------------------
put("repo_objects", "config", b"\x00" + json.dumps({"format": 1}).encode())
put("repo_objects", "header", b"\x05" + json.dumps({
    "id": "ab", "volume": "v", "snapshot": "s", "snapshot_id": 3, "pool": "p", "created": 1,
    "backed_up": 2, "size": 65536, "chunk_size": 65536, "cells": 1, "stored_bytes": 10}).encode())
# A table frame (selector 3: cells u32, frame number u8, then the frame): frame 1 of a
# table of 70,000 cells covers cells 65,536..70,000, two entries.
SEG = 65536
entries = b"".join(struct.pack("<Q", c) + bytes([c % 251]) * 32 for c in (SEG + 3, SEG + 4000))
frame = b"SBTF\x01" + struct.pack("<QII", SEG, 70000 - SEG, 2) + entries
put("repo_objects", "frame", b"\x03" + struct.pack("<I", 70000) + b"\x01" + frame)

# --- metadata: damage steps (op, index, offset, byte) ---------------------------------
put("metadata", "none", b"")
put("metadata", "flip", bytes([1, 3, 0, 0xff, 1, 7, 9, 0x00]))
put("metadata", "drop_and_insert", bytes([0, 2, 0, 0, 4, 0, 9, 0]) + b"L\x00\x00\x00\x00\x00\x00\x00\x09" + b'{"id":9}')
