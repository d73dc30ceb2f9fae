#!/usr/bin/python3
"""A minimal hook back end for bench/hook-latency.sh: HTTP/1.1 keep-alive on
127.0.0.1:PORT (0: kernel-picked, printed as "backend port N"), answers every
POST with 200 {} after DELAY_MS (default 0). Not a test: no checks.
  bench/hook-backend.py [PORT] [DELAY_MS]"""
import asyncio
import sys


async def serve(r, w, delay):
    try:
        while True:
            head = await r.readuntil(b'\r\n\r\n')
            n = 0
            for line in head.split(b'\r\n'):
                if line[:15].lower() == b'content-length:':
                    n = int(line[15:])
            await r.readexactly(n)
            if delay:
                await asyncio.sleep(delay)
            w.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                    b'Content-Length: 2\r\n\r\n{}')
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        w.close()


async def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    delay = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0
    srv = await asyncio.start_server(lambda r, w: serve(r, w, delay), '127.0.0.1', port)
    print('backend port %d' % srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()

asyncio.run(main())
