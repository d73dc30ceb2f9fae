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
import select
import stat
import struct
import sys
import tempfile
import unittest
import urllib.parse

sys.dont_write_bytecode = True          # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402
from imdclient import (API_KEY, T, Client, Imd, ImdCase, api, assert_clean_exit,  # noqa: E402,F401
                       decode_bin, open_tcp, py_token, scenario, upgrade_status, within)


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


# ====================================================== connection limits ===

class TestPreauthInput(ImdCase):
    # max_message is far above the 8192-byte pre-authentication limit: an
    # anonymous peer must not get a max_message buffer
    server_args = ('--max-message', '1000000')

    @scenario()
    async def test_tcp_big_frame_before_auth_1009(self):
        r, w = await open_tcp(self.srv.tcp)
        w.write(struct.pack('!I', 9000) + b'\x01')      # declares 9000 bytes, sends 1
        body = await wire.read_tcp_frame(r, what='the error')
        m = decode_bin(body)
        # the close notice: error op with the close code, then EOF
        self.assertEqual((m['op'], m['code'], m['reason']),
                         ('error', 1009, 'frame too big before authentication'), m)
        self.assertEqual(await wire.read_to_eof(r), b'')

    @scenario()
    async def test_ws_big_frame_before_auth_1009(self):
        r, w = await open_tcp(self.srv.ws)
        w.write(wire.upgrade_request(self.srv.ws, '/ws', wire.new_key(), protocol='imp.json'))
        head = await within(r.readuntil(b'\r\n\r\n'), what='the 101')
        self.assertTrue(head.startswith(b'HTTP/1.1 101'), head)
        w.write(wire.ws_frame(wire.OP_TEXT, b'{', length=9000))
        while True:
            _, op, payload = await wire.read_ws_frame(r)
            if op == wire.OP_CLOSE:
                break
        self.assertEqual(wire.close_code(payload), 1009)
        self.assertIn(b'before authentication', payload)

    @scenario()
    async def test_big_message_after_auth_passes(self):
        a = await self.client('tcp', 'a')
        b = await self.client('json', 'b')
        data = '"%s"' % ('x' * 20000)
        ack = await a.msg('big', data, to=b.uid)
        await b.expect('msg', id=ack['id'], data=data)

    @scenario()
    async def test_long_upgrade_request_431(self):
        r, w = await open_tcp(self.srv.ws)
        req = wire.upgrade_request(self.srv.ws, '/ws', wire.new_key(), protocol='imp.json')
        w.write(req[:-2] + b'X-Pad: ' + b'p' * 9000 + b'\r\n\r\n')
        head = await within(r.readuntil(b'\r\n\r\n'), what='the answer')
        self.assertTrue(head.startswith(b'HTTP/1.1 431'), head)


class TestConnsPerUser(ImdCase):
    server_args = ('--max-conns-per-user', '2')

    @scenario()
    async def test_newest_refused(self):
        a1 = await self.client('json', 'a', device='d1')
        a2 = await self.client('tcp', 'a', device='d2')
        for kind in ('json', 'bin', 'tcp'):
            c = await Client.open(self.srv.tcp if kind == 'tcp' else self.srv.ws, kind)
            m = await c.auth(self.uid('a'), py_token(self.uid('a'), 'd3'), 'd3')
            self.assertEqual((m['op'], m.get('code'), m.get('reason')),
                             ('error', 429, 'too many connections for this user'), m['_raw'])
            self.assertEqual(await c.closed(), 1008)
        q = urllib.parse.urlencode({'uid': self.uid('a'), 'token': py_token(self.uid('a'), 'd3'),
                                    'device': 'd3'}, quote_via=urllib.parse.quote)
        self.assertEqual(await upgrade_status(self.srv.ws, '/ws?' + q), 403)
        # the two open ones still get messages; another uid is not affected
        b = await self.client('bin', 'b')
        ack = await b.msg('m1', '1', to=a1.uid)
        await a1.expect('msg', id=ack['id'])
        await a2.expect('msg', id=ack['id'])
        r = await api(self.srv, 'GET', '/v1/users/%s/presence' % a1.uid)
        self.assertEqual(r.status, 200, r)
        # one closes: a new one fits
        await a1.close()
        a3 = await self.client('query', 'a', device='d3')
        ack = await b.msg('m2', '2', to=a3.uid)
        await a3.expect('msg', id=ack['id'])


class TestMaxConnectionsAuto(unittest.TestCase):
    """Without --max-connections, imd derives its limit from the open-file
    limit; at the limit a new connection is closed at once."""

    @scenario()
    async def test_auto_from_rlimit(self):
        tmp = tempfile.mkdtemp(prefix='imd-it-wrap-')
        wrapper = os.path.join(tmp, 'imd')
        with open(wrapper, 'w') as f:
            f.write('#!/bin/sh\nulimit -n 300 || exit 97\nexec "%s" "$@"\n' % os.environ['IMD'])
        os.chmod(wrapper, 0o755)
        real = os.environ['IMD']
        os.environ['IMD'] = wrapper
        try:
            srv = Imd()
        finally:
            os.environ['IMD'] = real
        try:
            # printed with the port lines (one flush); wait for it if not
            out = srv.out
            while b'at most' not in out and select.select([srv.proc.stdout], [], [], T)[0]:
                chunk = os.read(srv.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
            out = out.decode()
            self.assertIn('at most 172 connections', out)   # 300 - 128 reserved
            conns = []
            for i in range(172):
                conns.append(await open_tcp(srv.tcp))
            # all 172 are accepted: a ping on the last one is answered
            r, w = conns[-1]
            w.write(wire.tcp_frame(bytes([7])))
            self.assertEqual(decode_bin(await wire.read_tcp_frame(r))['op'], 'pong')
            r, w = await open_tcp(srv.tcp)
            self.assertEqual(await wire.read_to_eof(r), b'')   # the 173rd: closed at once
            for _, w in conns:
                w.close()
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            os.unlink(wrapper)
            os.rmdir(tmp)
        assert_clean_exit(rc, log)


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
