#!/usr/bin/env python3
"""The disk's floor under a durable message path, in a file in DIR, for
SECONDS, open loop (messages are due at a fixed RATE whether or not the
disk kept up):
  each   one write of BYTES and one fdatasync per message, in turn (the
         latency of each append+fdatasync, and how late the loop ran);
  group  a group commit, like imd's store thread and Redis's
         `appendfsync always`: each commit writes BYTES for every message
         due since the last one and calls fdatasync once; a message's
         latency is from its due time until the commit that holds it
         returned. No store that acks after fsync can beat this on the
         same disk at the same rate.
Prints p50, p90, p99, p99.9 and max (ms) and the commits made.
  bench/sync-latency.py [DIR] [RATE] [SECONDS] [BYTES] [each|group]
"""
import os
import sys
import tempfile
import time

d = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
rate = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
secs = float(sys.argv[3]) if len(sys.argv) > 3 else 10
size = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
mode = sys.argv[5] if len(sys.argv) > 5 else 'each'
if mode not in ('each', 'group'):
    sys.exit('usage: bench/sync-latency.py [DIR] [RATE] [SECONDS] [BYTES] [each|group]')
path = os.path.join(d, 'sync-latency.%d' % os.getpid())
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
buf = b'x' * size
lat, lag = [], []
period = 1e9 / rate
n = int(rate * secs)
commits = 0
t0 = time.monotonic_ns()
try:
    k = 0
    while k < n:
        due = t0 + k * period
        now = time.monotonic_ns()
        if now < due:
            time.sleep((due - now) / 1e9)
            now = time.monotonic_ns()
        if mode == 'each':
            lag.append(now - due)
            os.write(fd, buf)
            os.fdatasync(fd)
            lat.append(time.monotonic_ns() - now)
            k += 1
        else:
            upto = min(n, int((now - t0) / period) + 1)  # every message due by now
            os.write(fd, buf * (upto - k))
            os.fdatasync(fd)
            done = time.monotonic_ns()
            lat.extend(done - (t0 + j * period) for j in range(k, upto))
            k = upto
        commits += 1
finally:
    os.close(fd)
    os.unlink(path)


def q(v, p):
    return v[min(len(v) - 1, int(len(v) * p))] / 1e6


lat.sort()
lag.sort()
print('sync-latency: %d x %d B at %d/s in %s, %s: %d commits (fdatasync)'
      % (n, size, rate, d, mode, commits))
line = ('RESULT mode=%s p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f commits=%d'
        % (mode, q(lat, .5), q(lat, .9), q(lat, .99), q(lat, .999), lat[-1] / 1e6, commits))
if lag:
    line += ' lag_p99_ms=%.3f' % q(lag, .99)
print(line)
