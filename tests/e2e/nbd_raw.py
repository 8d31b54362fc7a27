#!/usr/bin/env python3
"""Hostile NBD clients on a raw socket: each case must get the protocol's error reply or a
clean disconnect, and the daemon must go on serving. Usage: nbd_raw.py SOCKET VOL SNAPEXPORT"""
import socket
import struct
import sys

SOCK, VOL, SNAP = sys.argv[1:4]
IHAVEOPT = 0x49484156454F5054
OPT_REPLY = 0x0003E889045565A9
REQ = 0x25609513
SIMPLE = 0x67446698
STRUCT = 0x668E33EF


def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(SOCK)
    hello = recvn(s, 18)
    assert hello[:8] == b"NBDMAGIC" and struct.unpack(">Q", hello[8:16])[0] == IHAVEOPT, hello
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s


def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError(f"closed after {len(b)} of {n} bytes")
        b += c
    return b


def opt(s, o, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, o, len(data)) + data)


def opt_reply(s):
    magic, o, typ, ln = struct.unpack(">QIII", recvn(s, 20))
    assert magic == OPT_REPLY, hex(magic)
    return o, typ, recvn(s, ln)


def go(s, name, structured=False):
    if structured:
        opt(s, 8)
        assert opt_reply(s)[1] == 1
    opt(s, 7, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
    size = flags = None
    while True:
        o, typ, data = opt_reply(s)
        if typ == 1:
            return size, flags
        if typ == 3 and struct.unpack(">H", data[:2])[0] == 0:
            size, flags = struct.unpack(">QH", data[2:12])
        elif typ != 3:
            raise AssertionError(f"GO failed: {typ:#x} {data!r}")


def cmd(s, typ, off, length, flags=0, payload=b"", cookie=7):
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, off, length) + payload)


def simple_reply(s):
    magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    assert magic == SIMPLE, hex(magic)
    return err


def expect_closed(s):
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, socket.timeout):
        pass


def case(name):
    print(f"  nbd_raw: {name}", flush=True)


case("bad handshake option magic -> disconnect")
s = conn()
s.sendall(struct.pack(">QII", 0x1234, 7, 0))
expect_closed(s)

case("unknown option -> NBD_REP_ERR_UNSUP, then GO works")
s = conn()
opt(s, 999, b"xyz")
o, typ, _ = opt_reply(s)
assert o == 999 and typ == (1 << 31) + 1, typ
size, flags = go(s, VOL)
assert size and size > 0

case("unknown export -> NBD_REP_ERR_UNKNOWN")
s2 = conn()
opt(s2, 7, struct.pack(">I", 7) + b"missing" + struct.pack(">H", 0))
assert opt_reply(s2)[1] == (1 << 31) + 6
s2.close()

case("malformed GO payload -> NBD_REP_ERR_INVALID")
s2 = conn()
opt(s2, 7, struct.pack(">I", 100) + b"ab")
assert opt_reply(s2)[1] == (1 << 31) + 3
s2.close()

case("oversized option -> disconnect")
s2 = conn()
s2.sendall(struct.pack(">QII", IHAVEOPT, 6, 1 << 30))
try:
    o, typ, _ = opt_reply(s2)
    assert typ == (1 << 31) + 9, typ
except EOFError:
    pass
expect_closed(s2)

case("write a known pattern")
cmd(s, 1, 0, 4096, payload=b"\x5a" * 4096)
assert simple_reply(s) == 0

case("out-of-range read -> EINVAL, connection stays")
cmd(s, 0, size - 512, 4096)
assert simple_reply(s) == 22
cmd(s, 0, 2**64 - 4096, 8192)
assert simple_reply(s) == 22

case("oversized read -> EINVAL")
cmd(s, 0, 0, 64 << 20)
assert simple_reply(s) == 22

case("unknown command -> EINVAL; unknown flags -> EINVAL")
cmd(s, 77, 0, 0)
assert simple_reply(s) == 22
cmd(s, 0, 0, 4096, flags=0x4000)
assert simple_reply(s) == 22

case("block status without negotiation -> EINVAL")
cmd(s, 7, 0, 4096)
assert simple_reply(s) == 22

case("read back the pattern")
cmd(s, 0, 0, 4096)
assert simple_reply(s) == 0
assert recvn(s, 4096) == b"\x5a" * 4096

case("bad request magic -> disconnect")
s.sendall(b"\x00" * 28)
expect_closed(s)

case("oversized write -> error and disconnect, nothing written")
s = conn()
go(s, VOL)
cmd(s, 1, 0, 64 << 20)
assert simple_reply(s) == 75
expect_closed(s)

case("write to a snapshot export -> EPERM")
s = conn()
_, flags = go(s, SNAP, structured=True)
assert flags & 2, "snapshot export must be read-only"
cmd(s, 1, 0, 4096, payload=b"\x11" * 4096)
assert simple_reply(s) == 1
cmd(s, 4, 0, 4096)
assert simple_reply(s) == 1
case("structured read error chunk for out-of-range read")
cmd(s, 0, 1 << 50, 4096)
magic, flags_, typ, cookie, ln = struct.unpack(">IHHQI", recvn(s, 20))
assert magic == STRUCT and typ == (1 << 15) + 1, (hex(magic), typ)
err = struct.unpack(">I", recvn(s, ln)[:4])[0]
assert err == 22, err
cmd(s, 2, 0, 0)
s.close()

case("data intact after all of it")
s = conn()
go(s, VOL)
cmd(s, 0, 0, 4096)
assert simple_reply(s) == 0
assert recvn(s, 4096) == b"\x5a" * 4096
cmd(s, 2, 0, 0)
print("nbd_raw: all cases passed")
