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
from imdclient import main as imdclient_main  # noqa: E402
from imdclient import (API_KEY, SECRET, T, Client, Imd, ImdCase, api, imd_with_nofile,  # noqa: E402,F401
                       assert_clean_exit, connect, parse_metrics, run_cli, decode_bin, open_tcp, py_token, scenario, upgrade_status, within,
                       token_exp, token_iat)


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
        srv = imd_with_nofile(300)
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
            m = parse_metrics((await api(srv, 'GET', '/metrics')).body.decode())
            self.assertEqual(m['imd_connections_max'], 172, m)   # what alerts compare with
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
        assert_clean_exit(rc, log)


# ============================================== client-chosen strings ===

class TestDeviceAndPlatform(ImdCase):
    @scenario()
    async def test_over_64_bytes_refused(self):
        uid = self.uid('a')
        for field in ('device', 'platform'):
            for kind in ('json', 'tcp'):
                c = await Client.open(self.srv.tcp if kind == 'tcp' else self.srv.ws, kind)
                dev, plat = ('d' * 65, 'web') if field == 'device' else ('d1', 'p' * 65)
                m = await c.auth(uid, py_token(uid), dev, plat)
                self.assertEqual((m['op'], m.get('code'), m.get('reason')),
                                 ('error', 400, field + ' too long'), m['_raw'])
                self.assertEqual(await c.closed(), 4401)
            q = urllib.parse.urlencode({'uid': uid, 'token': py_token(uid),
                                        field: 'x' * 65}, quote_via=urllib.parse.quote)
            self.assertEqual(await upgrade_status(self.srv.ws, '/ws?' + q), 403)
        c = await self.client('json', 'a', device='d' * 64, platform='p' * 64)
        await c.close()

    @scenario()
    async def test_platform_series_cannot_be_exhausted(self):
        async def by_platform():
            r = await api(self.srv, 'GET', '/metrics')
            self.assertEqual(r.status, 200, r)
            return {k: v for k, v in parse_metrics(r.body.decode()).items()
                    if k.startswith('imd_connections_by_platform')}

        async def settled():
            # on_close runs when the transport goes; wait until every
            # connection of this test is counted out
            for _ in range(200):
                m = await by_platform()
                if sum(m.values()) == 0:
                    return m
                await asyncio.sleep(0.02)
            self.fail('connections still counted: %r' % m)

        # more made-up platforms than there are series, one after another
        for i in range(40):
            c = await self.client('tcp', 'junk%d' % i, platform='junk-%d' % i)
            await c.close()
        await settled()
        # then 20 at once: 16 get a series, the rest are "other"
        held = [await self.client('tcp', 'held%d' % i, platform='held-%d' % i) for i in range(20)]
        m = await by_platform()
        self.assertEqual(m['imd_connections_by_platform{platform="other"}'], 4, m)
        self.assertEqual(sum(m.values()), 20, m)
        for c in held:
            await c.close()
        m = await settled()
        self.assertEqual(len(m), 17, m)         # 16 idle series at 0, and "other"
        # a real platform still gets its own series
        w = await self.client('json', 'w', platform='web')
        m = await by_platform()
        self.assertEqual(m.get('imd_connections_by_platform{platform="web"}'), 1, m)
        await w.close()


# ============================================= credentials and data dir ===

class TestCredentialsAndDataDir(unittest.TestCase):
    def start(self, *args, **kw):
        srv = Imd(*args, **kw)
        self.addCleanup(srv.remove_data)
        self.addCleanup(lambda: srv.alive() and srv.kill())
        return srv

    def tmpdir(self):
        d = tempfile.mkdtemp(prefix='imd-it-cred-')
        self.addCleanup(lambda: __import__('shutil').rmtree(d, ignore_errors=True))
        return d

    @scenario()
    async def test_secret_and_api_key_files(self):
        d = self.tmpdir()
        sf, kf = os.path.join(d, 'secret'), os.path.join(d, 'key')
        for path, text in ((sf, SECRET), (kf, 'file-api-key-0123456789')):
            with open(path, 'w') as f:
                f.write(text + '\n')
            os.chmod(path, 0o600)
        srv = self.start('--secret-file', sf, '--api-key-file', kf, secret=None, api_key=None)
        c = await connect(srv, 'json', 'filed')            # a token of SECRET verifies
        r = await api(srv, 'GET', '/v1/users/filed/presence', key='file-api-key-0123456789')
        self.assertEqual(r.status, 200, r)
        self.assertEqual((await api(srv, 'GET', '/metrics', key=API_KEY)).status, 401)
        await c.close()
        self.assertNotIn('visible to every local user', srv.log())
        self.assertNotIn('warning', srv.log())
        assert_clean_exit(*srv.stop())
        # a secret on the command line works, with a warning
        srv = self.start()
        self.assertIn('--secret on the command line is visible', srv.log())
        self.assertIn('--api-key on the command line is visible', srv.log())
        assert_clean_exit(*srv.stop())

    def test_bad_credentials_exit_2(self):
        d = self.tmpdir()
        short = os.path.join(d, 'short')
        with open(short, 'w') as f:
            f.write('fifteen-bytes-k\n')
        empty = os.path.join(d, 'empty')
        open(empty, 'w').close()
        data = os.path.join(d, 'data')
        base = ('--data', data, '--ws', 'off', '--tcp', 'off', '--http', 'off')
        for args, msg in (
                (('--secret', SECRET, '--secret-file', short), 'not both'),
                (('--api-key', 'k' * 20, '--api-key-file', short, '--secret', SECRET), 'not both'),
                (('--secret-file', os.path.join(d, 'missing')), 'cannot read'),
                (('--secret-file', empty), 'cannot read'),
                (('--secret', SECRET, '--api-key-file', short), 'at least 16'),
                (('--secret', SECRET, '--api-key', 'fifteen-bytes-k'), 'at least 16'),
                (('--secret', SECRET, '--max-message', str((16 << 20) + 1)), 'max-message'),
                (('--secret', SECRET, '--max-message', '15'), 'max-message'),
                (('--secret', SECRET, '--max-message', '4294967295'), 'max-message')):
            with self.subTest(args=args):
                rc, out, err = run_cli(*base, *args)
                self.assertEqual(rc, 2, (out, err))
                self.assertIn(msg, err)

    @scenario()
    async def test_data_dir_modes(self):
        # a new data dir (imd makes it), under a permissive umask: 0700, and
        # everything imd writes in it is for its own user only
        parent = self.tmpdir()
        data = os.path.join(parent, 'data')
        old = os.umask(0o022)
        try:
            # (the later --data wins; the fixture's own must exist: it is the cwd)
            srv = self.start('--data', data, data=parent, secret=None, api_key=None)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(data).st_mode), 0o700)
        with open(os.path.join(data, 'api-key')) as f:
            key = f.read().strip()
        r = await api(srv, 'PUT', '/v1/groups/g/members', {'add': ['x']}, key=key)
        self.assertEqual(r.status, 200, r)      # writes to the store
        log = srv.log()
        assert_clean_exit(*srv.stop())
        names = sorted(os.listdir(data))
        self.assertIn('imd.db', names)
        for name in names:
            mode = stat.S_IMODE(os.stat(os.path.join(data, name)).st_mode)
            self.assertEqual(mode & 0o077, 0, '%s has mode %o' % (name, mode))
        self.assertNotIn('warning', log)
        # an existing data dir and secret open to others: warned about
        os.chmod(data, 0o755)
        os.chmod(os.path.join(data, 'secret'), 0o644)
        srv2 = self.start('--data', data, data=parent, secret=None, api_key=None)
        log = srv2.log()
        self.assertIn('data dir %s has mode 0755' % data, log)
        self.assertIn('secret file %s has mode 0644' % os.path.join(data, 'secret'), log)
        self.assertNotIn(os.path.join(data, 'api-key'), log)
        assert_clean_exit(*srv2.stop())


# ========================================================== the API key ===

class TestApiKeyEveryRoute(ImdCase):
    ROUTES = (('POST', '/v1/messages', {'to': 'victim', 'data': 1}),
              ('GET', '/v1/users/victim/presence', None),
              ('GET', '/v1/users/victim/inbox', None),
              ('POST', '/v1/users/victim/kick', {}),
              ('GET', '/v1/groups/g1/members', None),
              ('PUT', '/v1/groups/g1/members', {'add': ['intruder']}),
              ('GET', '/metrics', None))

    @scenario()
    async def test_missing_or_wrong_key_401_and_no_effect(self):
        victim = await connect(self.srv, 'json', 'victim')
        r = await api(self.srv, 'PUT', '/v1/groups/g1/members', {'add': ['victim']})
        self.assertEqual(r.status, 200, r)
        for method, path, body in self.ROUTES:
            for key, headers in ((None, None), ('wrong-key-0123456789', None),
                                 (API_KEY + 'x', None), (API_KEY[:-1], None),
                                 (None, {'Authorization': 'Basic ' + API_KEY}),
                                 (None, {'Authorization': 'Bearer'})):
                with self.subTest(method=method, path=path, key=key, headers=headers):
                    r = await api(self.srv, method, path, body, key=key, headers=headers)
                    self.assertEqual(r.status, 401, r)
                    self.assertEqual(r.ctype, 'application/json', r)
                    self.assertIsInstance(r.json, dict, r)
                    self.assertIsInstance(r.json.get('error'), str, r)
        # none of them did anything: no message, no kick, no new member
        await victim.barrier('nothing pushed or closed by a refused request')
        r = await api(self.srv, 'GET', '/v1/groups/g1/members')
        self.assertEqual((r.status, r.json), (200, {'gid': 'g1', 'members': ['victim']}), r)
        r = await api(self.srv, 'GET', '/v1/users/victim/inbox')
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json.get('last'), 0, r)            # nothing stored
        # and every route works with the right key
        for method, path, body in self.ROUTES:
            with self.subTest(method=method, path=path, key='right'):
                r = await api(self.srv, method, path, body)
                self.assertEqual(r.status // 100, 2, r)


# ================================== documented behaviour (PROTOCOL.md, imd.8) ===

class TestDocumentedAnswers(ImdCase):
    server_args = ('--max-message', '4096')

    @scenario()
    async def test_sync_beyond_the_inbox_end(self):
        """docs/PROTOCOL.md §8.11 / §16.4: a since beyond the inbox's end
        is answered with last = the inbox's end (0 for an empty inbox)."""
        b = await self.client('tcp', 'b')
        await b.send('sync', since=500)
        await b.expect('sync_end', last=0, more=False)
        a = await self.client('json', 'a')
        for i in range(3):
            ack = await a.msg('m%d' % i, str(i), to=b.uid)
            await b.expect('msg', id=ack['id'], seq=i + 1)
        await b.send('sync', since=500)
        end = await b.expect('sync_end', last=3, more=False)
        self.assertNotIn('gap', end)
        await b.send('sync', since=3)                # at the end: last = since
        await b.expect('sync_end', last=3, more=False)
        await b.send('sync', since=1)
        await b.expect('msg', seq=2)
        await b.expect('msg', seq=3)
        await b.expect('sync_end', last=3, more=False)

    @scenario()
    async def test_upgrade_with_bad_or_expired_token_403_body(self):
        """§2.3: imd's refusal reasons are the body of the 403."""
        uid = self.uid('q')
        for token, reason in ((py_token(uid)[:-2] + 'AA', b'invalid token\n'),
                              (py_token(uid, exp=1000), b'token expired\n')):
            q = urllib.parse.urlencode({'uid': uid, 'token': token},
                                       quote_via=urllib.parse.quote)
            r, w = await open_tcp(self.srv.ws)
            w.write(wire.upgrade_request(self.srv.ws, '/ws?' + q, wire.new_key(),
                                         protocol='imp.json'))
            head = await within(r.readuntil(b'\r\n\r\n'), what='the 403')
            self.assertTrue(head.startswith(b'HTTP/1.1 403 '), head)
            n = int(head.lower().split(b'content-length:')[1].split(b'\r\n')[0])
            self.assertEqual(await within(r.readexactly(n), what='the body'), reason)

    @scenario()
    async def test_tcp_length_prefix_over_max_message(self):
        """§3: an authenticated TCP client declaring a frame over
        --max-message is closed with 1009 `frame too big` at once."""
        c = await self.client('tcp', 'big')
        c.w.write(struct.pack('!I', 4097) + b'\x03')
        m = decode_bin(await wire.read_tcp_frame(c.r, what='the close notice'))
        self.assertEqual((m['op'], m['code'], m['reason']), ('error', 1009, 'frame too big'))
        self.assertEqual(await wire.read_to_eof(c.r), b'')

    @scenario()
    async def test_field_length_over_32_bits_malformed(self):
        """§7: a field length (uvarint) over 2^32-1, or of more than 5
        bytes, gives 400 `malformed message`; the connection stays."""
        c = await self.client('tcp', 'varint')
        for varint in (b'\xff\xff\xff\xff\x1f', b'\x80\x80\x80\x80\x80\x01'):
            c.w.write(wire.tcp_frame(b'\x07\x0b' + varint + b'x'))
            await c.expect('error', code=400, reason='malformed message')
        await c.barrier()

    @scenario()
    async def test_presence_kick_members_shapes(self):
        """imd(8): the outer shape and status of the API answers."""
        a = await self.client('tcp', 'a', device='d1', platform='desktop')
        r = await api(self.srv, 'GET', '/v1/users/%s/presence' % a.uid)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(sorted(r.json), ['connections', 'count', 'online', 'uid'], r)
        self.assertEqual((r.json['uid'], r.json['online'], r.json['count']), (a.uid, True, 1))
        self.assertEqual(sorted(r.json['connections'][0]),
                         ['address', 'conn', 'device', 'platform', 'since', 'transport'])
        r = await api(self.srv, 'GET', '/v1/users/nobody/presence')
        self.assertEqual((r.status, r.json),
                         (200, {'uid': 'nobody', 'online': False, 'connections': [], 'count': 0}))
        r = await api(self.srv, 'PUT', '/v1/groups/g9/members', {'add': ['x']})
        self.assertEqual((r.status, r.json), (200, {'gid': 'g9', 'members': ['x']}), r)
        r = await api(self.srv, 'POST', '/v1/users/%s/kick' % a.uid, {})
        self.assertEqual((r.status, r.json), (200, {'uid': a.uid, 'kicked': 1}), r)
        r = await api(self.srv, 'GET', '/metrics', key='nope-nope-nope-nope')
        self.assertEqual((r.status, r.json), (401, {'error': 'missing or bad API key'}), r)


class TestTokenCli(unittest.TestCase):
    def test_help_and_data_dir(self):
        rc, out, err = run_cli('token', '--help')
        self.assertEqual(rc, 0, err)
        self.assertIn('--data DIR', out)
        self.assertIn('--secret-file FILE', out)
        d = tempfile.mkdtemp(prefix='imd-it-tok-')
        try:
            path = os.path.join(d, 'secret')
            with open(path, 'w') as f:
                f.write(SECRET + '\n')
            os.chmod(path, 0o600)
            for args in (('--data', d), ('--secret-file', path)):
                rc, out, err = run_cli('token', *args, '--uid', 'u1', '--device', 'd1')
                self.assertEqual(rc, 0, err)
                self.assertEqual(out.strip(), py_token('u1', 'd1', token_exp(out),
                                                       iat=token_iat(out)))
            rc, out, err = run_cli('token', '--secret-file', os.path.join(d, 'no'), '--uid', 'u')
            self.assertEqual(rc, 2, (out, err))
        finally:
            __import__('shutil').rmtree(d, ignore_errors=True)


# ============================================ the HTTP API before the key ===

def rss_kib(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS')


class TestApiBodyWithoutKey(ImdCase):
    """A request without the right key gets its 401 without imd buffering its
    body: 40 clients each sending 200 KB of a 260 KB body with a wrong key
    leave imd's memory where it was (before: ~8 MB more)."""
    N, SENT, DECLARED = 40, 200000, 260000

    @staticmethod
    async def drained(port, n):
        """Wait until n established connections to local port have nothing
        left in their receive queue."""
        while True:
            busy = ready = 0
            with open('/proc/net/tcp') as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if int(fields[1].split(':')[1], 16) != port or fields[3] != '01':
                        continue
                    if int(fields[4].split(':')[1], 16):
                        busy += 1
                    else:
                        ready += 1
            if ready >= n and not busy:
                return
            await asyncio.sleep(0.01)

    @scenario()
    async def test_unauthorized_bodies_not_buffered(self):
        pid = self.srv.proc.pid
        # warm up: the first requests allocate what every later one reuses
        for key in ('wrong-key-0123456789', API_KEY):
            r = await api(self.srv, 'POST', '/v1/messages', {'to': 'w', 'data': 1}, key=key)
        before = rss_kib(pid)
        conns = []
        for i in range(self.N):
            r, w = await open_tcp(self.srv.http)
            w.write(('POST /v1/messages HTTP/1.1\r\nHost: x\r\n'
                     'Authorization: Bearer wrong-key-0123456789\r\n'
                     'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n'
                     % self.DECLARED).encode() + b'{"data":"' + b'x' * (self.SENT - 9))
            conns.append((r, w))
        for r, w in conns:
            await within(w.drain(), what='the body')
        # imd has read every byte: no receive queue left on its side of
        # these connections (/proc/net/tcp), then a look at its memory
        await within(self.drained(self.srv.http, self.N), what='imd to read the bodies')
        grown = rss_kib(pid) - before
        self.assertLess(grown, 3000, 'imd grew by %d KiB for unauthorized bodies' % grown)
        # the rest of each body: answered 401, as before
        r, w = conns[0]
        w.write(b'x' * (self.DECLARED - self.SENT - 2) + b'"}')
        head = await within(r.readuntil(b'\r\n\r\n'), what='the 401')
        self.assertTrue(head.startswith(b'HTTP/1.1 401'), head)
        for r, w in conns:
            w.close()
        # with the key, a body still arrives whole
        r = await api(self.srv, 'POST', '/v1/messages', {'to': 'w', 'data': 'y' * 60000})
        self.assertEqual(r.status, 200, r)


if __name__ == '__main__':
    imdclient_main()
