#!/usr/bin/python3
"""Crash-test client on libnbd: `write` issues 4K writes of self-describing blocks at QD16
with a FLUSH every 32 writes until the server dies, logging every acknowledged write and
every completed flush; `verify` (after the server restarts) checks that every write
acknowledged before the last completed FLUSH reads back (the protocol's promise) and that
every acknowledged write reads back (snapblk's promise for a kill -9). No block is written
again while an earlier write to it is in flight, so the expected content is exact, except
that a later write to the block that was still in flight at the kill may have landed.
Usage: crash_writer.py write|verify URI LOG SEED"""
import random
import struct
import sys

import nbd

BS = 4096
mode, uri, logpath, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def content(blk, gen):
    return struct.pack("<QQQ", 0x534E4150424C4B31, blk, gen) * (BS // 24) + b"\0" * (BS % 24)


h = nbd.NBD()
h.connect_uri(uri)
nblocks = h.get_size() // BS

if mode == "write":
    log = open(logpath, "w")
    rnd = random.Random(seed)
    gen, acked, inflight, flush = 0, 0, {}, None
    try:
        while True:
            while len(inflight) < 16:
                gen += 1
                blk = rnd.randrange(nblocks)
                if any(v[0] == blk for v in inflight.values()):
                    continue
                buf = nbd.Buffer.from_bytearray(bytearray(content(blk, gen)))
                inflight[h.aio_pwrite(buf, blk * BS)] = (blk, gen, buf)
            if flush is None and acked and acked % 32 == 0:
                flush = (h.aio_flush(), acked)
            h.poll(-1)
            for c in list(inflight):
                if h.aio_command_completed(c):
                    blk, g, _ = inflight.pop(c)
                    acked += 1
                    log.write(f"W {blk} {g}\n")
            if flush is not None and h.aio_command_completed(flush[0]):
                log.write(f"F {flush[1]}\n")
                flush = None
            log.flush()
    except nbd.Error as e:
        log.close()
        print(f"writer: server gone after {acked} acknowledged writes ({e.string})")
else:
    writes, flushed = [], 0
    for line in open(logpath):
        p = line.split()
        if p[0] == "W":
            writes.append((int(p[1]), int(p[2])))
        elif p[0] == "F":
            flushed = int(p[1])
    last = {}
    for i, (b, g) in enumerate(writes):
        last[b] = (g, i)
    lost_flushed = lost_acked = superseded = 0
    for b, (g, i) in last.items():
        got = h.pread(BS, b * BS)
        if got == content(b, g):
            continue
        # A later write to the block that was in flight at the kill may have landed
        # (unacknowledged writes may or may not be applied): that is not a loss.
        magic, blk, gen = struct.unpack_from("<QQQ", got)
        if magic == 0x534E4150424C4B31 and blk == b and gen > g and got == content(b, gen):
            superseded += 1
            continue
        lost_acked += 1
        if i < flushed:
            lost_flushed += 1
        if lost_acked <= 5:
            print(f"block {b}: acknowledged write {g} ({'flushed' if i < flushed else 'not flushed'}) lost"
                  f" (found {'gen %d' % gen if magic == 0x534E4150424C4B31 and blk == b else 'other data'})")
    print(f"verify: {len(writes)} acknowledged writes ({flushed} flushed), {len(last)} blocks checked, "
          f"{superseded} superseded by in-flight writes, {lost_flushed} flushed lost, {lost_acked} acknowledged lost")
    h.shutdown()
    sys.exit(1 if lost_acked else 0)
