#!/usr/bin/python3
"""Reads an NBD export cell by cell and compares each cell with a reference export.
Prints JSON: {"ok": cells read and equal, "eio": cells that failed with EIO, "wrong": cells
read with different bytes, "other": cells failing otherwise, "wrong_at"/"other_errors":
the first few offenders, "seconds"}. A failed read is retried on a fresh connection only
if the server dropped the connection (it should not).
Usage: nbd_read_cells.py URI REFERENCE_URI CELL_SIZE [FIRST_CELL [COUNT]]"""
import errno
import json
import sys
import time

import nbd

uri, ref_uri, cell = sys.argv[1], sys.argv[2], int(sys.argv[3])
first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
h = nbd.NBD()
h.connect_uri(uri)
r = nbd.NBD()
r.connect_uri(ref_uri)
size = h.get_size()
if r.get_size() != size:
    sys.exit(f"size {size} differs from the reference's {r.get_size()}")
cells = (size + cell - 1) // cell
count = int(sys.argv[5]) if len(sys.argv) > 5 else cells - first
out = {"ok": 0, "eio": 0, "wrong": 0, "other": 0, "wrong_at": [], "other_errors": []}
t0 = time.monotonic()
for c in range(first, min(cells, first + count)):
    off = c * cell
    n = min(cell, size - off)
    want = r.pread(n, off)
    try:
        got = h.pread(n, off)
    except nbd.Error as e:
        if e.errnum == errno.EIO:
            out["eio"] += 1
        else:
            out["other"] += 1
            if len(out["other_errors"]) < 5:
                out["other_errors"].append(f"cell {c}: {e}")
        if h.aio_is_dead() or h.aio_is_closed():
            out["reconnects"] = out.get("reconnects", 0) + 1
            h = nbd.NBD()
            h.connect_uri(uri)
        continue
    if got == want:
        out["ok"] += 1
    else:
        out["wrong"] += 1
        if len(out["wrong_at"]) < 5:
            out["wrong_at"].append(c)
out["seconds"] = round(time.monotonic() - t0, 2)
h.shutdown()
r.shutdown()
print(json.dumps(out))
