#!/usr/bin/python3
"""Open N WebSocket connections (ws:// or wss://) to im-echo, authenticate
each through the upgrade query, print "connected N", and hold them idle
until stdin closes. Used by bench/tls-rss-per-conn.sh.
    tls-hold.py URL N [CAFILE]"""
import asyncio
import ssl
import sys

import websockets


async def main():
    url, n = sys.argv[1], int(sys.argv[2])
    ctx = None
    if url.startswith('wss:'):
        ctx = ssl.create_default_context(cafile=sys.argv[3])
        ctx.check_hostname = False
    sem = asyncio.Semaphore(64)
    conns = []

    async def one(i):
        async with sem:
            ws = await websockets.connect('%s?uid=u%d&token=t' % (url, i), ssl=ctx,
                                          subprotocols=['imp.json'], ping_interval=None,
                                          compression=None, open_timeout=60)
            m = await ws.recv()
            assert m.startswith('{"op":"auth_ok"'), m
            conns.append(ws)

    await asyncio.gather(*(one(i) for i in range(n)))
    print('connected %d' % len(conns), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


asyncio.run(main())
