#!/usr/bin/python3
"""imd against hostile or careless peers and operators: room and connection
caps, input before authentication, credential files and data-directory
modes, bounded option values, and the API key on every route.

Run:  IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_hardening.py

Same rules as test_imd.py: real sockets, every wait bounded, every imd exits
0 on SIGTERM with no sanitizer report.
"""
import asyncio
import os
import sys
import unittest

sys.dont_write_bytecode = True          # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (API_KEY, ImdCase, api, scenario, within)  # noqa: E402,F401


# ================================================================== rooms ===

class TestMaxRooms(ImdCase):
    server_args = ('--max-rooms', '2')

    @scenario()
    async def test_join_over_cap_429(self):
        for kind in ('json', 'tcp'):
            c = await self.client(kind, 'a-' + kind)
            for i in range(2):
                await c.send('join', room=self.uid('r%d' % i), cid='j%d' % i)
                await c.expect('ack', cid='j%d' % i)
            await c.send('join', room=self.uid('r2'), cid='j2')
            await c.expect('error', code=429, reason='too many rooms', cid='j2')
            # a room it is in is not a new one; the connection stays usable
            await c.send('join', room=self.uid('r1'), cid='again')
            await c.expect('ack', cid='again')
            r = await api(self.srv, 'POST', '/v1/messages',
                          {'room': self.uid('r2'), 'data': 1})
            self.assertEqual((r.status, r.json['delivered']), (200, 0), r)
            await c.send('leave', room=self.uid('r0'), cid='l0')
            await c.expect('ack', cid='l0')
            await c.send('join', room=self.uid('r2'), cid='j3')
            await c.expect('ack', cid='j3')
            await c.close()


def main():
    argv = list(sys.argv)
    if '--imd' in argv:
        i = argv.index('--imd')
        os.environ['IMD'] = argv[i + 1]
        del argv[i:i + 2]
    if not os.environ.get('IMD') or not os.access(os.environ['IMD'], os.X_OK):
        sys.exit('IMD=%r is not an executable imd binary' % os.environ.get('IMD'))
    unittest.main(argv=argv, verbosity=2)


if __name__ == '__main__':
    main()
