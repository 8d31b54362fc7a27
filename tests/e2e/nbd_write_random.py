#!/usr/bin/python3
"""Writes COUNT blocks of SIZE random bytes at random SIZE-aligned offsets of an NBD export
(distinct offsets). Usage: nbd_write_random.py URI COUNT SIZE"""
import os
import random
import sys

import nbd

uri, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
slots = h.get_size() // size
for slot in random.sample(range(slots), count):
    h.pwrite(os.urandom(size), slot * size)
h.flush()
h.shutdown()
