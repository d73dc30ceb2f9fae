#!/usr/bin/python3
"""How often pushes reach a device out of seq order with worker threads
(docs/THREADS.md, Order): N members of one group each send M messages to it,
one at a time (the next after the ack), all at once; every member acks what
it gets and counts the pushes that arrive with a seq below one it already
got (a client then syncs once).
  IMD=build-rel/daemon/imd bench/group-order.py N M [THREADS]"""
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '../tests/integration'))
import imdclient as ic  # noqa: E402

if os.environ.get('IMD'):
    os.environ['IMD'] = os.path.abspath(os.environ['IMD'])  # imd runs in its data dir

N, M = int(sys.argv[1]), int(sys.argv[2])
threads = sys.argv[3] if len(sys.argv) > 3 else '2'

async def main():
    srv = ic.Imd('--threads', threads, '--rate-msgs', '0', '--rate-user-msgs', '0',
                 '--rate-receiver', '0', '--conn-rate', '0')
    try:
        uids = ['m%d' % i for i in range(N)]
        await ic.api(srv, 'PUT', '/v1/groups/g/members', {'add': uids})
        cs = [await ic.connect(srv, 'json', u) for u in uids]
        stats = {'ooo': 0, 'got': 0}
        done = asyncio.Event()
        async def reader(c):
            mx = 0
            while True:
                p = await c.recv('a push', timeout=30)
                if p['op'] == 'msg':
                    s = p['seq']
                    stats['got'] += 1
                    if s < mx: stats['ooo'] += 1
                    mx = max(mx, s)
                    await c.send('ack', id=p['id'], seq=s)
                # acks for our sends are counted by the sender task via a queue
                elif p['op'] == 'ack':
                    c.acks.put_nowait(p)
        async def sender(c):
            for i in range(M):
                await c.send('msg', cid='c%d' % i, group='g', data=json.dumps({'t': i}))
                await c.acks.get()
        for c in cs: c.acks = asyncio.Queue()
        rs = [asyncio.create_task(reader(c)) for c in cs]
        await asyncio.gather(*(sender(c) for c in cs))
        want = N * M * (N - 1)
        for _ in range(300):
            if stats['got'] >= want: break
            await asyncio.sleep(0.1)
        r = ic.http_call(srv.http, 'GET', '/metrics')
        syncs = [l for l in r.body.decode().splitlines() if l.startswith('imd_syncs_total')]
        print('threads=%s members=%d each=%d pushes=%d/%d out_of_order=%d (%.2f%%) %s' % (
            threads, N, M, stats['got'], want, stats['ooo'],
            100.0 * stats['ooo'] / max(1, stats['got']), syncs))
        for t in rs: t.cancel()
    finally:
        srv.stop(); srv.remove_data()

asyncio.run(asyncio.wait_for(main(), 60))
