#!/usr/bin/python3
"""Room messages across two imd nodes, for bench/cluster-latency.sh (case
rooms-*): MEMBERS connections on each node join one room, then one sender on
node A sends MSGS room messages (at most 64 unacked) and waits until every
member on node B has every one. Prints 'connected' once all have joined (the
caller snapshots Redis then; sending starts 1 s later) and a RESULT line.
  room-relay.py URL_A URL_B SECRET_FILE [MSGS] [MEMBERS]
Tokens are minted from the secret as in docs/TOKENS.md."""
import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time

import websockets


def token(secret, uid):
    exp = int(time.time()) + 3600
    msg = 'imd-token-v1\n%s\n*\n%d' % (uid, exp)
    mac = hmac.new(secret, msg.encode(), hashlib.sha256).digest()
    return '1.%d.*.%s' % (exp, base64.urlsafe_b64encode(mac).rstrip(b'=').decode())


async def member(url, secret, uid):
    ws = await websockets.connect('%s?uid=%s&token=%s&device=d1' % (url, uid, token(secret, uid)),
                                  subprotocols=['imp.json'], max_queue=None)
    await ws.send(json.dumps({'op': 'join', 'room': 'bench', 'cid': 'j'}))
    while True:
        m = json.loads(await ws.recv())
        if m['op'] == 'ack' and m.get('cid') == 'j':
            return ws
        if m['op'] == 'error':
            raise RuntimeError('join: %r' % m)


async def drain(ws, n, got):
    while got[0] < n:
        m = json.loads(await ws.recv())
        if m['op'] == 'msg' and m.get('room') == 'bench':
            got[0] += 1


async def main():
    url_a, url_b, secret_file = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
    k = int(sys.argv[5]) if len(sys.argv) > 5 else 10
    with open(secret_file, 'rb') as f:
        secret = f.readline().strip()
    sender = await member(url_a, secret, 'room-sender')
    far = [await member(url_b, secret, 'rb%d' % i) for i in range(k)]
    near = [await member(url_a, secret, 'ra%d' % i) for i in range(k - 1)]
    print('connected %d' % (1 + len(far) + len(near)), flush=True)
    await asyncio.sleep(1)
    counts = [[0] for _ in far + near]
    readers = [asyncio.create_task(drain(ws, n, c)) for ws, c in zip(far + near, counts)]
    t0 = time.monotonic()
    sent = acked = 0
    while acked < n:
        while sent < n and sent - acked < 64:
            await sender.send(json.dumps({'op': 'msg', 'cid': 'r%d' % sent, 'room': 'bench',
                                          'data': {'n': sent}}))
            sent += 1
        m = json.loads(await sender.recv())
        if m['op'] == 'ack':
            acked += 1
        elif m['op'] == 'error':
            raise RuntimeError('send: %r' % m)
    await asyncio.wait_for(asyncio.gather(*readers), 30)
    secs = time.monotonic() - t0
    print('RESULT mode=rooms msgs=%d members_a=%d members_b=%d delivered=%d secs=%.2f' %
          (n, len(near), len(far), sum(c[0] for c in counts), secs), flush=True)
    for ws in [sender] + far + near:
        await ws.close()


asyncio.run(main())
