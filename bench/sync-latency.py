#!/usr/bin/env python3
"""The disk's floor under a durable message path: append BYTES and call
fdatasync RATE times a second for SECONDS (open loop, like a store that
commits once per batch), in a file in DIR, and print the latency of each
append+fdatasync (p50, p90, p99, p99.9, max) and how late the loop ran.
A message acked after an fsync cannot be faster than this; compare its
tail with imd's (bench/chat-latency.sh, bench/cluster-latency.sh).
  bench/sync-latency.py [DIR] [RATE] [SECONDS] [BYTES]
"""
import os
import sys
import tempfile
import time

d = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
rate = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
secs = float(sys.argv[3]) if len(sys.argv) > 3 else 10
size = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
path = os.path.join(d, 'sync-latency.%d' % os.getpid())
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
buf = b'x' * size
lat, lag = [], []
period = 1e9 / rate
t0 = time.monotonic_ns()
n = int(rate * secs)
try:
    for k in range(n):
        due = t0 + k * period
        now = time.monotonic_ns()
        if now < due:
            time.sleep((due - now) / 1e9)
            now = time.monotonic_ns()
        lag.append(now - due)
        os.write(fd, buf)
        os.fdatasync(fd)
        lat.append(time.monotonic_ns() - now)
finally:
    os.close(fd)
    os.unlink(path)


def q(v, p):
    return v[min(len(v) - 1, int(len(v) * p))] / 1e6


lat.sort()
lag.sort()
print('sync-latency: %d x (%d B + fdatasync) at %d/s in %s' % (n, size, rate, d))
print('RESULT p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f lag_p99_ms=%.3f'
      % (q(lat, .5), q(lat, .9), q(lat, .99), q(lat, .999), lat[-1] / 1e6, q(lag, .99)))
