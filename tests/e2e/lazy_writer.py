#!/usr/bin/python3
"""A client of a lazily restored volume, for kill -9 tests.

    lazy_writer.py write URI LOG SEED   write random 4 KiB blocks (plain, FUA) with flushes
                                        until the server goes away; LOG gets one line per
                                        request before it is sent ("S seq block kind") and
                                        one once it is acknowledged ("A seq")
    lazy_writer.py verify URI BASE_URI LOG
                                        checks every block of URI: a block the client wrote
                                        holds its last acknowledged write or a write sent
                                        after it (unacknowledged); every other block holds
                                        BASE_URI's (the backup's) data; never zeros or stale
                                        data. (Same boot: even unflushed acknowledged writes
                                        must survive a kill -9.)
Sequence numbers keep growing across runs (the LOG is appended to)."""
import os
import random
import sys

import nbd

BS = 4096


def pattern(seq):
    return seq.to_bytes(8, "little") * (BS // 8)


def last_seq(log):
    n = 0
    if os.path.exists(log):
        for line in open(log):
            p = line.split()
            if p and p[0] == "S":
                n = max(n, int(p[1]))
    return n


def write(uri, log, seed):
    rng = random.Random(seed)
    seq = last_seq(log)
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // BS
    out = open(log, "a")
    try:
        while True:
            seq += 1
            r = rng.random()
            if r < 0.15:
                out.write(f"S {seq} - flush\n")
                out.flush()
                h.flush()
            else:
                # Mostly a small region (its cells are soon hydrated by this client, so
                # writes land on freshly hydrated cells: the case a resume must not undo),
                # sometimes anywhere (each such write waits for its cell's fetch).
                b = rng.randrange(min(blocks, 1024)) if rng.random() < 0.8 else rng.randrange(blocks)
                kind = "fua" if r < 0.35 else "plain"
                out.write(f"S {seq} {b} {kind}\n")
                out.flush()
                h.pwrite(pattern(seq), b * BS, nbd.CMD_FLAG_FUA if kind == "fua" else 0)
            out.write(f"A {seq}\n")
            out.flush()
    except nbd.Error:
        pass  # the daemon was killed
    print(f"writer stopped at request {seq}")


def verify(uri, base_uri, log):
    allowed = {}  # block -> set of seqs allowed (None: the backup's data)
    pending = {}
    for line in open(log):
        p = line.split()
        if p[0] == "S" and p[2] != "-":
            pending[int(p[1])] = int(p[2])
            allowed.setdefault(int(p[2]), {None}).add(int(p[1]))
        elif p[0] == "A" and int(p[1]) in pending:
            seq = int(p[1])
            allowed[pending.pop(seq)] = {seq}
    h = nbd.NBD()
    h.connect_uri(uri)
    base = nbd.NBD()
    base.connect_uri(base_uri)
    size = h.get_size()
    bad = []
    step = 1 << 20
    for off in range(0, size, step):
        got = h.pread(step, off)
        want = base.pread(step, off)
        for i in range(0, step, BS):
            b = (off + i) // BS
            blk = got[i:i + BS]
            ok = allowed.get(b, {None})
            if blk == want[i:i + BS] and None in ok:
                continue
            seq = int.from_bytes(blk[:8], "little")
            if seq in ok and blk == pattern(seq):
                continue
            bad.append(f"block {b}: allowed {sorted(x if x else 0 for x in ok)}, "
                       f"holds {'zeros' if blk == bytes(BS) else 'seq ' + str(seq)}")
    written = len(allowed)
    print(f"verified {size // BS} blocks, {written} written by the client")
    if bad:
        print("FAIL:", *bad[:20], sep="\n  ", file=sys.stderr)
        sys.exit(1)


if sys.argv[1] == "write":
    write(sys.argv[2], sys.argv[3], int(sys.argv[4]))
else:
    verify(sys.argv[2], sys.argv[3], sys.argv[4])
