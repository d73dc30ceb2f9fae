#!/usr/bin/python3
"""End-to-end tests of daemon/imd over real sockets.

Run:  IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_imd.py
  or  /usr/bin/python3 tests/integration/test_imd.py --imd build/daemon/imd

Needs the `websockets` package (10.x asyncio client API). Every imd is
started on port 0 with a temporary data directory, every wait has a timeout,
and every imd must exit 0 on SIGTERM with no sanitizer report on its stderr.
Clients of four kinds mix freely: a web client (WebSocket imp.json, auth op),
an ios client (imp.json, auth in the upgrade query), an android client
(WebSocket imp.bin) and a raw TCP client (length-prefixed binary IMP).
"""
import asyncio
import json
import os
import re
import socket
import stat
import sys
import tempfile
import time
import unittest
import urllib.parse

sys.dont_write_bytecode = True          # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import main as imdclient_main  # noqa: E402
from imdclient import (API_KEY, SANITIZER_RE, SECRET, T, Client, Imd, ImdCase, RawWS,  # noqa: E402
                       api, assert_clean_exit, cli_token, connect, forge, http_call,
                       parse_metrics, py_token, raw_http, request_bytes, run_cli, scenario,
                       token_exp, token_iat, upgrade_status, within, ws_frame)

KINDS = ('json', 'query', 'bin', 'tcp')
# data that must pass byte for byte: a big integer, raw UTF-8, escapes, spacing
DATA = ('{"n":12345678901234567890,"f":-1.5e-300,"s":"h\u00e9llo \u4e2d\u6587 \U0001F600",'
        '"e":"\\u00e9\\n\\"q\\"","a":[true,false,null,{}], "sp" : [ 1 ,2 ]}')
# `imd token` mints v2 tokens (with their issue time, for revocations)
TOKEN_RE = re.compile(r'^2\.[1-9][0-9]{0,14}\.[1-9][0-9]{0,11}\.[d*]\.[A-Za-z0-9_-]{43}$')


def now_ms():
    return int(time.time() * 1000)


class ServerCase(ImdCase):
    """imd's own fixture plus the checks several test classes share."""

    async def expect_auth_refused(self, kind, uid, token, device, reason):
        """The token is refused: 401 + close 4401 (op auth), or 403 (query)."""
        if kind == 'query':
            path = '/ws?' + urllib.parse.urlencode(
                {'uid': uid, 'token': token, 'device': device, 'platform': 'ios'},
                quote_via=urllib.parse.quote)
            self.assertEqual(await upgrade_status(self.srv.ws, path), 403, path)
            return
        c = await Client.open(self.srv.tcp if kind == 'tcp' else self.srv.ws, kind)
        m = await c.auth(uid, token, device)
        self.assertEqual((m['op'], m.get('code'), m.get('reason')), ('error', 401, reason),
                         m['_raw'])
        self.assertEqual(await c.closed(), 4401)


# ====================================================================== CLI ===

class TestCLI(unittest.TestCase):
    def imd(self, *args, **kw):
        """run_cli, and no sanitizer report on stderr."""
        rc, out, err = run_cli(*args, **kw)
        self.assertFalse(SANITIZER_RE.search(err), 'sanitizer report for imd %s:\n%s'
                         % (' '.join(args), err))
        return rc, out, err

    def test_unknown_flag_and_bad_values_exit_2(self):
        with tempfile.TemporaryDirectory() as d:
            rc, out, err = self.imd('--bogus', cwd=d)
            self.assertEqual(rc, 2, err)
            self.assertIn("unknown option '--bogus'", err)
            self.assertIn('usage: imd', err)
            for args, msg in ((['--data', d, '--ws'], 'needs a value'),
                              (['--data', d, '--max-message', 'lots'], 'not a number'),
                              (['--data', d, '--commit-delay', '100001'],
                               'commit-delay: at most 100000'),
                              (['--data', d, '--commit-delay', 'soon'], 'not a number'),
                              (['--data', d, '--coalesce', '1001'],
                               'coalesce: at most 1000'),
                              (['--data', d, '--secret', 'short', '--ws', 'off', '--tcp', 'off',
                                '--http', 'off'], 'at least 16'),
                              (['token', '--secret', SECRET, '--uid', 'u', '--bogus', 'x'],
                               "unknown option '--bogus'"),
                              (['token', '--secret', SECRET], 'needs --secret'),
                              (['token', '--secret', 'short', '--uid', 'u'], 'at least 16'),
                              (['token', '--secret', SECRET, '--uid', 'u', '--device', '*'],
                               'cannot mint'),
                              (['token', '--secret', SECRET, '--uid', 'u', '--ttl', '-5'],
                               'not a number')):
                with self.subTest(args=args):
                    rc, out, err = self.imd(*args, cwd=d)
                    self.assertEqual(rc, 2, (out, err))
                    self.assertIn(msg, err)
                    self.assertEqual(out, '')

    def test_help_exits_0(self):
        for args in (['--help'], ['-h'], ['token', '--help']):
            rc, out, err = self.imd(*args)
            self.assertEqual(rc, 0, err)
            self.assertIn('usage: imd', out)
            for flag in ('--ws', '--tcp', '--http', '--secret', '--api-key', '--data',
                         '--max-message', '--heartbeat', '--auth-timeout', 'IMD_API_KEY'):
                self.assertIn(flag, out)

    def test_bad_config_file_exits_2(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'imd.conf')
            with open(path, 'w') as f:
                f.write('# comment\nws = off\ncolour = blue\n')
            rc, _, err = self.imd('--config', path, cwd=d)
            self.assertEqual(rc, 2, err)
            self.assertIn("unknown key 'colour'", err)

    def test_documented_token_format(self):
        """The known-answer vectors of docs/TOKENS.md, computed here, and
        `imd token` output equal to this computation."""
        k = '0123456789abcdef0123456789abcdef'
        for secret, uid, dev, exp, tok in (
                (k, 'alice', 'd1', 2000000000,
                 '1.2000000000.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg'),
                (k, 'alice', '', 2000000000,
                 '1.2000000000.*.ypyOwxedXv7M0367gMfu7LID_QU_6tqq0c21ZYHMnII'),
                ('p\u00e2t\u00e9 secret: with spaces', 'zo\u00eb@example.org', 'iPhone 15 Pro',
                 1767225600, '1.1767225600.d.GKWyQ37LEH6FIJmspeJODzeqRWG6HBWrbM1K7XgcKD8')):
            self.assertEqual(py_token(uid, dev, exp, secret), tok)
        for uid, dev in (('alice', 'd1'), ('alice', None), ('zo\u00eb', 'iPhone 15 Pro')):
            with self.subTest(uid=uid, device=dev):
                t0 = int(time.time())
                tok = cli_token(uid, dev, ttl=600)
                self.assertRegex(tok, TOKEN_RE)
                self.assertLessEqual(len(tok), 76)
                self.assertTrue(t0 * 1000 <= token_iat(tok) <= time.time() * 1000, tok)
                self.assertTrue(t0 + 600 <= token_exp(tok) <= int(time.time()) + 600, tok)
                self.assertEqual(tok, py_token(uid, dev or '', token_exp(tok), iat=token_iat(tok)))
        t0 = int(time.time())
        exp = token_exp(cli_token('u'))                          # default ttl: one day
        self.assertTrue(t0 + 86400 <= exp <= int(time.time()) + 86400, exp)

    def test_token_secret_from_data_dir(self):
        with tempfile.TemporaryDirectory() as d:
            secret = 'a-secret-kept-in-the-data-dir'
            with open(os.path.join(d, 'secret'), 'w') as f:
                f.write(secret + '\n')
            rc, out, err = self.imd('token', '--data', d, '--uid', 'u', '--device', 'pc')
            self.assertEqual(rc, 0, err)
            tok = out.strip()
            self.assertEqual(tok, py_token('u', 'pc', token_exp(tok), secret, token_iat(tok)))


class TestDataDirAndConfig(unittest.TestCase):
    def start(self, *args, **kw):
        srv = Imd(*args, **kw)
        self.addCleanup(srv.remove_data)
        self.addCleanup(lambda: srv.alive() and srv.kill())
        return srv

    def stop(self, srv):
        assert_clean_exit(*srv.stop())

    @scenario()
    async def test_generated_secret_and_api_key(self):
        srv = self.start(secret=None, api_key=None)
        self.assertIn(b'generated a new secret in', srv.out)
        files = {}
        for name in ('secret', 'api-key'):
            path = os.path.join(srv.data, name)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, name)
            with open(path) as f:
                files[name] = f.read()
            self.assertRegex(files[name], r'^[0-9a-f]{64}\n$')
        secret, key = files['secret'].strip(), files['api-key'].strip()
        rc, out, err = run_cli('token', '--data', srv.data, '--uid', 'gen', '--device', 'd1')
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.strip(), py_token('gen', 'd1', token_exp(out), secret,
                                                token_iat(out)))
        c = await connect(srv, 'json', 'gen', token=out.strip())
        self.assertEqual((await api(srv, 'GET', '/v1/users/gen/presence', key=key)).status, 200)
        self.assertEqual((await api(srv, 'GET', '/metrics')).status, 401)
        refused = await Client.open(srv.ws, 'json')
        self.assertEqual((await refused.auth('gen', py_token('gen', 'd1')))['code'], 401)
        await c.close()
        self.stop(srv)
        srv2 = self.start(data=srv.data, secret=None, api_key=None)
        self.assertIn(b'secret read from', srv2.out)
        await connect(srv2, 'tcp', 'gen', token=out.strip())
        self.assertEqual((await api(srv2, 'GET', '/healthz', key=None)).status, 200)
        self.assertEqual((await api(srv2, 'GET', '/metrics', key=key)).status, 200)
        self.stop(srv2)

    @scenario()
    async def test_config_file_then_env_then_flag(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, 'imd.conf')
            with open(path, 'w') as f:
                f.write('# imd test config\nws = 127.0.0.1:0\ntcp = 127.0.0.1:0\n'
                        'http = 127.0.0.1:0\napi_key = key-from-the-file\n'
                        'secret = %s\nheartbeat = 11\n' % SECRET)
            srv = self.start('--config', path, api_key=None, secret=None, listen=False,
                             env={'IMD_API_KEY': 'key-from-the-env'})
            for key, status in (('key-from-the-env', 200), ('key-from-the-file', 401)):
                self.assertEqual((await api(srv, 'GET', '/metrics', key=key)).status, status)
            self.assertEqual((await connect(srv, 'json', 'cfg')).auth_ok['hb'], 11)
            self.stop(srv)
            srv = self.start('--config', path, '--heartbeat', '12', api_key='key-from-the-flag',
                             secret=None, listen=False, env={'IMD_API_KEY': 'key-from-the-env'})
            for key, status in (('key-from-the-flag', 200), ('key-from-the-env', 401)):
                self.assertEqual((await api(srv, 'GET', '/metrics', key=key)).status, status)
            self.assertEqual((await connect(srv, 'tcp', 'cfg')).auth_ok['hb'], 12)
            self.stop(srv)


# ===================================================================== auth ===

class TestAuth(ServerCase):
    server_args = ('--heartbeat', '7', '--auth-timeout', '1500')

    @scenario()
    async def test_every_kind_authenticates(self):
        conns = set()
        for kind in KINDS:
            c = await self.client(kind, 'u', device='dev-' + kind)
            self.assertEqual(c.auth_ok['hb'], 7)
            self.assertRegex(c.auth_ok['conn'], r'^[0-9a-f]+$')
            conns.add(c.auth_ok['conn'])
            await c.barrier()
        self.assertEqual(len(conns), 4, 'connection ids are not unique')
        # an `imd token` token, and an any-device token on two devices
        await self.client('json', 'cli', token=cli_token(self.uid('cli'), 'd1'))
        anyd = py_token(self.uid('any'))
        for kind, dev in (('tcp', 'pc'), ('query', 'phone'), ('bin', '')):
            await self.client(kind, 'any', device=dev, token=anyd)

    @scenario()
    async def test_expired_token_401(self):
        uid = self.uid('u')
        tok = py_token(uid, 'd1', exp=int(time.time()) - 5)
        for kind in KINDS:
            with self.subTest(kind=kind):
                await self.expect_auth_refused(kind, uid, tok, 'd1', 'token expired')

    @scenario()
    async def test_cli_token_with_ttl_1_expires(self):
        uid = self.uid('u')
        tok = cli_token(uid, 'd1', ttl=1)
        exp = token_exp(tok)
        self.assertTrue(time.time() - 1 <= exp <= time.time() + 1, tok)
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.1)   # the one accepted wait
        await self.expect_auth_refused('json', uid, tok, 'd1', 'token expired')

    @scenario()
    async def test_invalid_tokens_401(self):
        uid = self.uid('u')
        good = py_token(uid, 'phone')
        cases = [(forge(good), 'phone'),                      # one character flipped
                 (good, 'tablet'),                            # bound to another device
                 (py_token(self.uid('other'), 'phone'), 'phone'),   # another uid
                 (py_token(uid, 'phone', secret='another secret, 16+ bytes'), 'phone'),
                 (forge(py_token(uid, 'phone', exp=int(time.time()) - 5)), 'phone'),
                 (good + '=', 'phone'), ('garbage', 'phone'), (good.replace('.d.', '.*.'), 'phone'),
                 (good.replace('1.', '2.', 1), 'phone')]
        for tok, dev in cases:
            for kind in KINDS:
                with self.subTest(token=tok, device=dev, kind=kind):
                    await self.expect_auth_refused(kind, uid, tok, dev, 'invalid token')
        await self.client('query', 'u', device='phone', token=good)

    @scenario()
    async def test_auth_timeout_4408(self):
        for kind in ('json', 'tcp'):
            c = await Client.open(self.srv.tcp if kind == 'tcp' else self.srv.ws, kind)
            self.assertEqual(await c.closed(), 4408, kind)

    @scenario()
    async def test_msg_before_auth_401_connection_stays(self):
        c = await Client.open(self.srv.ws, 'json')
        await c.send('msg', cid='early', to='x', data='{}')
        await c.expect('error', code=401, cid='early')
        m = await c.auth(self.uid('u'), py_token(self.uid('u'), 'd1'))
        self.assertEqual(m['op'], 'auth_ok')


# ============================================================= 1:1 routing ===

class TestDirect(ServerCase):
    @scenario()
    async def test_mixed_platforms(self):
        cs = {k: await self.client(k, k) for k in KINDS}
        for s in KINDS:
            for r in KINDS:
                if r == s:
                    continue
                data = '{"from":"%s","to":"%s","x":%s}' % (s, r, DATA)
                ack = await cs[s].msg('c-' + r, data, to=cs[r].uid)
                self.assertRegex(ack['id'], r'^[0-9]+$')
                m = await cs[r].expect('msg', 'the msg %s->%s' % (s, r), id=ack['id'],
                                       to=cs[r].uid, data=data, **{'from': cs[s].uid})
                self.assertLess(abs(m['ts'] - now_ms()), 10000, m)
                self.assertNotIn('group', m)
                await cs[s].barrier('no copy on the sending connection')

    @scenario()
    async def test_multi_device_copies(self):
        a1 = await self.client('json', 'alice', device='laptop')
        a2 = await self.client('tcp', 'alice', device='desk')
        b = await self.client('query', 'bob', device='phone')
        ack = await a1.msg('m1', DATA, to=b.uid)
        for c in (b, a2):
            await c.expect('msg', id=ack['id'], to=b.uid, data=DATA, **{'from': a1.uid})
        await a1.barrier('no copy on the sending connection')
        ack = await b.msg('m2', '"back"', to=a1.uid)
        for c in (a1, a2):
            await c.expect('msg', id=ack['id'], to=a1.uid, data='"back"', **{'from': b.uid})
        await b.barrier()
        ack = await a2.msg('m3', '"note to self"', to=a1.uid)      # to oneself
        await a1.expect('msg', id=ack['id'], to=a1.uid, data='"note to self"')
        await a2.barrier()
        await b.barrier()

    @scenario()
    async def test_order_of_100_messages(self):
        a = await self.client('json', 'alice')
        b1 = await self.client('tcp', 'bob')
        b2 = await self.client('bin', 'bob', device='d2')
        for i in range(100):
            await a.send('msg', cid='c%d' % i, to=b1.uid, data='{"i":%d}' % i)
        ids = [(await a.expect('ack', cid='c%d' % i))['id'] for i in range(100)]
        self.assertEqual(len(set(ids)), 100, 'ids are not unique')
        self.assertEqual([int(i) for i in ids], sorted(int(i) for i in ids), 'ids do not grow')
        for b in (b1, b2):
            for i in range(100):
                await b.expect('msg', 'msg %d' % i, id=ids[i], data='{"i":%d}' % i)

    @scenario()
    async def test_bad_targets_400_connection_stays(self):
        for kind in ('json', 'tcp'):
            c = await self.client(kind, 'u' + kind)
            for cid, target in (('none', {}), ('two', {'to': 'x', 'group': 'g'}),
                                ('three', {'to': 'x', 'group': 'g', 'room': 'r'}),
                                ('tr', {'to': 'x', 'room': 'r'}), ('empty', {'to': ''})):
                await c.send('msg', cid=cid, **target, data='1')
                m = await c.expect('error', 'the error for ' + cid, code=400, cid=cid)
                self.assertTrue(m['reason'])
            await c.send('msg', to='x', data='1')                   # no cid
            await c.expect('error', code=400)
            await c.send('msg', cid='nodata', to='x')
            await c.expect('error', code=400, cid='nodata')
            await c.msg('ok', '1', to='nobody-online')              # still works
        c = await self.client('json', 'j')
        for bad in ('{"op":"msg",', 'not json', '{"op":"bogus"}', '[1]', '{"op":"msg","to":5}'):
            await c.send_raw(bad)
            await c.expect('error', 'the error for %r' % bad, code=400)
        await c.msg('after', '2', to='nobody-online')


# =================================================================== groups ===

class TestGroups(ServerCase):
    @scenario()
    async def test_membership_fanout_and_removal(self):
        g, U = self.uid('g'), self.uid
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g,
                      {'add': [U('a'), U('b'), U('c')]})
        self.assertEqual((r.status, r.json), (200, {'gid': g, 'members': [U('a'), U('b'), U('c')]}))
        r = await api(self.srv, 'GET', '/v1/groups/%s/members' % g)
        self.assertEqual(r.json['members'], [U('a'), U('b'), U('c')])
        a1, a2 = await self.client('json', 'a'), await self.client('tcp', 'a', device='d2')
        b, c = await self.client('bin', 'b'), await self.client('query', 'c')
        d = await self.client('json', 'd')
        ack = await a1.msg('g1', DATA, group=g)
        for x in (a2, b, c):
            m = await x.expect('msg', id=ack['id'], group=g, data=DATA, **{'from': a1.uid})
            self.assertNotIn('to', m)
        for x in (a1, d):
            await x.barrier('no group message')
        await d.send('msg', cid='intruder', group=g, data='1')
        await d.expect('error', code=403, cid='intruder')
        await d.send('msg', cid='nogroup', group=self.uid('nosuch'), data='1')
        await d.expect('error', code=403, cid='nogroup')
        r = await api(self.srv, 'POST', '/v1/messages', '{"group":"%s","data":%s}' % (g, DATA))
        self.assertEqual((r.status, r.json['delivered']), (200, 4), r)
        for x in (a1, a2, b, c):
            await x.expect('msg', id=r.json['id'], group=g, data=DATA, **{'from': 'system'})
        await d.barrier()
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g, {'remove': [U('c')]})
        self.assertEqual(r.json['members'], [U('a'), U('b')])
        await c.send('msg', cid='removed', group=g, data='1')
        await c.expect('error', code=403, cid='removed')
        ack = await b.msg('g2', '"without c"', group=g)
        for x in (a1, a2):
            await x.expect('msg', id=ack['id'], data='"without c"')
        await c.barrier('nothing after the removal')
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g,
                      {'add': [U('d')], 'remove': [U('a'), U('b')]})
        self.assertEqual(r.json['members'], [U('d')])
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g, {'remove': [U('d')]})
        self.assertEqual(r.json, {'gid': g, 'members': []})
        r = await api(self.srv, 'POST', '/v1/messages', {'group': g, 'data': 1})
        self.assertEqual(r.status, 404, r)

    @scenario()
    async def test_membership_errors(self):
        path = '/v1/groups/%s/members' % self.uid('g')
        for body in ('{"add":"a"}', '{}', '[]', '{"add":[1]}', '{"add":[""]}', '{"add":',
                     '{"remove":"a"}'):
            with self.subTest(body=body):
                r = await api(self.srv, 'PUT', path, body)
                self.assertEqual(r.status, 400, r)
                self.assertIn('error', r.json)
        self.assertEqual((await api(self.srv, 'GET', path)).json['members'], [])


class TestGroupPersistence(unittest.TestCase):
    @scenario(90)
    async def test_membership_survives_restart(self):
        srv = Imd()
        self.addCleanup(srv.remove_data)
        self.addCleanup(lambda: srv.alive() and srv.kill())
        await api(srv, 'PUT', '/v1/groups/team/members', {'add': ['pa', 'pb', 'pc']})
        await api(srv, 'PUT', '/v1/groups/team/members', {'remove': ['pc']})
        await api(srv, 'PUT', '/v1/groups/gone/members', {'add': ['pa']})
        await api(srv, 'PUT', '/v1/groups/gone/members', {'remove': ['pa']})
        await api(srv, 'PUT', '/v1/groups/caf%C3%A9/members', {'add': ['zo\u00eb']})
        watcher = await connect(srv, 'json', 'watcher')
        rc, log = srv.stop()
        self.assertEqual(await watcher.closed(), 1001, 'shutdown close code')
        assert_clean_exit(rc, log)
        self.assertFalse(os.path.exists(os.path.join(srv.data, 'groups.json')),
                         'membership lives in the store, not in a side file')
        srv2 = Imd(data=srv.data)
        self.addCleanup(lambda: srv2.alive() and srv2.kill())
        for gid, members in (('team', ['pa', 'pb']), ('gone', []), ('caf%C3%A9', ['zo\u00eb'])):
            r = await api(srv2, 'GET', '/v1/groups/%s/members' % gid)
            self.assertEqual(r.json['members'], members, gid)
        pa, pb, pc = [await connect(srv2, k, u) for k, u in (('tcp', 'pa'), ('bin', 'pb'),
                                                             ('json', 'pc'))]
        ack = await pa.msg('after', '"restarted"', group='team')
        await pb.expect('msg', id=ack['id'], group='team', data='"restarted"')
        await pc.send('msg', cid='no', group='team', data='1')
        await pc.expect('error', code=403, cid='no')
        assert_clean_exit(*srv2.stop())


    @scenario(60)
    async def test_groups_json_is_migrated_once(self):
        """A data dir of an imd that kept groups in groups.json: its groups are
        imported into the store on first start and the file is set aside."""
        data = tempfile.mkdtemp(prefix='imd-migrate-')
        with open(os.path.join(data, 'groups.json'), 'w') as f:
            json.dump({'old': ['ma', 'mb'], 'empty': [], 'bad': 'x'}, f)
        srv = Imd(data=data)
        self.addCleanup(srv.remove_data)
        self.addCleanup(lambda: srv.alive() and srv.kill())
        r = await api(srv, 'GET', '/v1/groups/old/members')
        self.assertEqual(r.json['members'], ['ma', 'mb'])
        self.assertFalse(os.path.exists(os.path.join(data, 'groups.json')))
        self.assertTrue(os.path.exists(os.path.join(data, 'groups.json.migrated')))
        ma, mb = await connect(srv, 'json', 'ma'), await connect(srv, 'tcp', 'mb')
        ack = await ma.msg('m1', '"still a group"', group='old')
        await mb.expect('msg', id=ack['id'], group='old', data='"still a group"')
        assert_clean_exit(*srv.stop())
        srv2 = Imd(data=data)  # the second start imports nothing and keeps the members
        self.addCleanup(lambda: srv2.alive() and srv2.kill())
        r = await api(srv2, 'GET', '/v1/groups/old/members')
        self.assertEqual(r.json['members'], ['ma', 'mb'])
        assert_clean_exit(*srv2.stop())


# ==================================================================== rooms ===

class TestRooms(ServerCase):
    @scenario()
    async def test_join_fanout_leave(self):
        room = self.uid('lobby')
        a1, a2 = await self.client('json', 'a'), await self.client('tcp', 'a', device='d2')
        b, c = await self.client('bin', 'b'), await self.client('query', 'c')
        d = await self.client('json', 'd')
        for x in (a1, b, c):
            await x.send('join', room=room, cid='j-' + x.kind)
            m = await x.expect('ack', cid='j-' + x.kind)
            self.assertNotIn('id', m)
        await c.send('join', room=room)                     # again, without cid: no ack
        await c.barrier('no ack for a join without cid')
        ack = await a1.msg('r1', DATA, room=room)
        for x in (b, c):
            m = await x.expect('msg', id=ack['id'], room=room, data=DATA, **{'from': a1.uid})
            self.assertNotIn('to', m)
        for x in (a1, a2, d):
            await x.barrier('no room message: not in the room / the sender')
        for x in (d, a2):
            await x.send('msg', cid='outsider', room=room, data='1')
            await x.expect('error', code=403, cid='outsider')
        r = await api(self.srv, 'POST', '/v1/messages', '{"room":"%s","data":%s}' % (room, DATA))
        self.assertEqual((r.status, r.json['delivered']), (200, 3), r)
        for x in (a1, b, c):
            await x.expect('msg', id=r.json['id'], room=room, data=DATA, **{'from': 'system'})
        await b.send('leave', room=room, cid='l1')
        await b.expect('ack', cid='l1')
        ack = await c.msg('r2', '"b left"', room=room)
        await a1.expect('msg', id=ack['id'], data='"b left"')
        await b.barrier('nothing after leaving')
        await b.send('msg', cid='left', room=room, data='1')
        await b.expect('error', code=403, cid='left')
        r = await api(self.srv, 'POST', '/v1/messages', {'room': room, 'data': 2})
        self.assertEqual(r.json['delivered'], 2, r)
        await c.close()                                     # a closed connection leaves
        await a1.expect('msg', id=r.json['id'])
        r = await api(self.srv, 'POST', '/v1/messages', {'room': room, 'data': 3})
        self.assertEqual(r.json['delivered'], 1, r)
        r = await api(self.srv, 'POST', '/v1/messages', {'room': self.uid('empty'), 'data': 3})
        self.assertEqual((r.status, r.json['delivered']), (200, 0), r)

    @scenario()
    async def test_bad_join(self):
        c = await self.client('json', 'a')
        await c.send('join', cid='j')
        await c.expect('error', code=400, cid='j')
        await c.send('join', room='', cid='k')
        await c.expect('error', code=400, cid='k')


# ================================================================ HTTP push ===

class TestHttpPush(ServerCase):
    @scenario()
    async def test_push_to_user_list_and_offline(self):
        u1, u2 = await self.client('json', 'u'), await self.client('tcp', 'u', device='d2')
        v = await self.client('query', 'v')
        w = await self.client('bin', 'w')
        body = '{"to":"%s","data":%s}' % (u1.uid, DATA)
        r = await api(self.srv, 'POST', '/v1/messages', body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.ctype, 'application/json')
        self.assertEqual(r.json['delivered'], 2)
        self.assertRegex(r.json['id'], r'^[0-9]+$')
        for x in (u1, u2):
            m = await x.expect('msg', id=r.json['id'], to=u1.uid, data=DATA, **{'from': 'system'})
            self.assertLess(abs(m['ts'] - now_ms()), 10000)
            if x.kind == 'tcp':
                self.assertIn(DATA.encode(), m['_raw'])
        for x in (v, w):
            await x.barrier()
        body = json.dumps({'from': 'billing', 'to': [u1.uid, v.uid, w.uid, self.uid('off')]})
        r = await api(self.srv, 'POST', '/v1/messages', body[:-1] + ', "data" :  %s }' % DATA)
        self.assertEqual((r.status, r.json['delivered']), (200, 4), r)
        for x in (u1, u2, v, w):
            await x.expect('msg', id=r.json['id'], data=DATA, **{'from': 'billing'})
        r = await api(self.srv, 'POST', '/v1/messages', {'to': [self.uid('off')], 'data': None})
        self.assertEqual((r.status, r.json['delivered']), (200, 0), r)
        r2 = await api(self.srv, 'POST', '/v1/messages', {'to': self.uid('off'), 'data': 'x'})
        self.assertGreater(int(r2.json['id']), int(r.json['id']))
        r = await api(self.srv, 'POST', '/v1/messages',    # last "data" wins, as in IMP
                      '{"to":"%s","data":[1],"data":{"k":"v"}}' % u1.uid)
        for x in (u1, u2):
            await x.expect('msg', id=r.json['id'], data='{"k":"v"}')
        for x in (u1, u2, v, w):
            await x.barrier()

    @scenario()
    async def test_push_body_escapes_and_repeats(self):
        """The body is read by the scanner, not a tree: escaped uids and senders
        arrive unescaped, a repeated member counts once (the last), a to list
        with a uid twice reaches it once, and the answer is exact JSON."""
        u = await self.client('json', 'esc')
        esc = ''.join('\\u%04x' % ord(ch) for ch in u.uid)      # the uid, all \u escapes
        body = '{"from":"bil\\"l\\\\ing\\u00e9","to":"nobody","to":"%s","data":%s}' % (esc, DATA)
        r = await api(self.srv, 'POST', '/v1/messages', body)
        self.assertEqual((r.status, r.json['delivered'], r.json['stored']), (200, 1, 1), r)
        self.assertEqual(set(r.json), {'id', 'delivered', 'stored'})
        await u.expect('msg', id=r.json['id'], data=DATA, **{'from': 'bil"l\\ing\u00e9'})
        body = '{"to":["%s", "%s"],"data":%s}' % (esc, u.uid, DATA)
        r = await api(self.srv, 'POST', '/v1/messages', body)
        self.assertEqual((r.status, r.json['delivered']), (200, 1), r)
        await u.expect('msg', id=r.json['id'], data=DATA)
        await u.barrier()
        for bad in ('{"to":"a\\u0000b","data":1}', '{"to":["a","b\\u0000"],"data":1}',
                    '{"from":"x\\u0000","to":"a","data":1}'):
            r = await api(self.srv, 'POST', '/v1/messages', bad)
            self.assertEqual(r.status, 400, (bad, r))

# ======================================================== presence and kick ===

class TestPresenceKick(ServerCase):
    @scenario()
    async def test_presence_fields(self):
        t0 = now_ms()
        web = await self.client('json', 'p', device='laptop', platform='web')
        tcp = await self.client('tcp', 'p', device='desk', platform='desktop')
        ios = await self.client('query', 'p', device='phone', platform='ios')
        r = await api(self.srv, 'GET', '/v1/users/%s/presence' % web.uid)
        self.assertEqual(r.status, 200, r)
        p = r.json
        self.assertEqual((p['uid'], p['online'], p['count']), (web.uid, True, 3), p)
        got = {c['conn']: c for c in p['connections']}
        self.assertEqual(set(got), {x.auth_ok['conn'] for x in (web, tcp, ios)})
        for x, dev, plat, tr in ((web, 'laptop', 'web', 'ws'), (tcp, 'desk', 'desktop', 'tcp'),
                                 (ios, 'phone', 'ios', 'ws')):
            c = got[x.auth_ok['conn']]
            self.assertEqual(set(c), {'conn', 'device', 'platform', 'address', 'transport',
                                      'since'})
            self.assertEqual((c['device'], c['platform'], c['transport']), (dev, plat, tr))
            self.assertEqual(c['address'], '127.0.0.1:%d' % x.sockname()[1])
            self.assertTrue(t0 - 2000 <= c['since'] <= now_ms() + 2000, (c, t0))
        zoe = await self.client('bin', 'zo\u00eb/\u4e2d', device='iPhone 15 Pro')
        r = await api(self.srv, 'GET', '/v1/users/%s/presence'
                      % urllib.parse.quote(zoe.uid, safe=''))
        self.assertEqual((r.json['uid'], r.json['count']), (zoe.uid, 1), r)
        self.assertEqual(r.json['connections'][0]['device'], 'iPhone 15 Pro')
        r = await api(self.srv, 'GET', '/v1/users/%s/presence' % self.uid('ghost'))
        self.assertEqual(r.json, {'uid': self.uid('ghost'), 'online': False, 'connections': [],
                                  'count': 0})

    @scenario()
    async def test_kick_closes_4403(self):
        k1, k2 = await self.client('json', 'k'), await self.client('tcp', 'k', device='d2')
        k3 = await self.client('bin', 'k', device='d3')
        other = await self.client('query', 'other')
        r = await api(self.srv, 'POST', '/v1/users/%s/kick' % k1.uid)
        self.assertEqual((r.status, r.json), (200, {'uid': k1.uid, 'kicked': 3}))
        for x in (k1, k2, k3):
            self.assertEqual(await x.closed(), 4403, x.kind)
        r = await api(self.srv, 'GET', '/v1/users/%s/presence' % k1.uid)
        self.assertEqual((r.json['online'], r.json['count'], r.json['connections']),
                         (False, 0, []))
        ack = await other.msg('still', '1', to=other.uid)           # others unaffected
        self.assertTrue(ack['id'])
        again = await self.client('tcp', 'k')                         # no ban
        r = await api(self.srv, 'GET', '/v1/users/%s/presence' % k1.uid)
        self.assertEqual([c['conn'] for c in r.json['connections']], [again.auth_ok['conn']])
        r = await api(self.srv, 'POST', '/v1/users/%s/kick' % self.uid('nobody'))
        self.assertEqual(r.json['kicked'], 0)


# ================================================================= HTTP API ===

class TestHttpApi(ServerCase):
    def call(self, method, path, body=None, **kw):
        return http_call(self.srv.http, method, path, body, **kw)

    def assert_error(self, r, status):
        self.assertEqual(r.status, status, r)
        self.assertEqual(r.ctype, 'application/json', r)
        self.assertIsInstance(r.json.get('error'), str, r)

    def test_healthz_needs_no_key(self):
        r = self.call('GET', '/healthz', key=None)
        self.assertEqual((r.status, r.json), (200, {'status': 'ok'}))

    def test_api_key(self):
        for key, headers in ((None, None), ('wrong', None), (API_KEY + 'x', None),
                             (API_KEY[:-1], None), ('', None),
                             (None, {'Authorization': 'Basic ' + API_KEY}),
                             (None, {'Authorization': API_KEY})):
            for method, path in (('GET', '/metrics'), ('GET', '/v1/users/u/presence'),
                                 ('POST', '/v1/messages'), ('GET', '/v1/nothing')):
                with self.subTest(key=key, headers=headers, path=path):
                    self.assert_error(self.call(method, path, key=key, headers=headers), 401)
        self.assertEqual(self.call('GET', '/metrics').status, 200)

    def test_unknown_route_404_wrong_method_405(self):
        for path in ('/', '/v1', '/v2/messages', '/v1/nothing', '/v1/users/u/unknown',
                     '/v1/users//presence', '/v1/groups/g/other', '/v1/messages/extra'):
            with self.subTest(path=path):
                self.assert_error(self.call('GET', path), 404)
        for method, path in (('GET', '/v1/messages'), ('DELETE', '/v1/groups/g/members'),
                             ('POST', '/healthz'), ('GET', '/v1/users/u/kick'),
                             ('POST', '/metrics'), ('PUT', '/v1/users/u/presence')):
            with self.subTest(method=method, path=path):
                self.assert_error(self.call(method, path, '{}'), 405)

    def test_bad_message_bodies_400(self):
        for body in ('{"to":"a",', 'not json', '[1]', '', '{"to":"a"}', '{"to":"a","data":}',
                     '{"data":1}', '{"to":"a","group":"g","data":1}',
                     '{"to":"a","room":"r","data":1}', '{"to":[],"data":1}',
                     '{"to":5,"data":1}', '{"to":["a",5],"data":1}', '{"to":[""],"data":1}',
                     '{"from":5,"to":"a","data":1}', '{"group":5,"data":1}',
                     '{"room":["r"],"data":1}', '{"to":"a","x":{"data":1}}'):
            with self.subTest(body=body):
                self.assert_error(self.call('POST', '/v1/messages', body), 400)
        self.assertEqual(self.call('POST', '/v1/messages', '{"to":"a","data":1}').status, 200)
        self.assert_error(self.call('POST', '/v1/messages', '{"group":"nosuch","data":1}'), 404)

    def test_empty_uid_400(self):
        """An empty uid is refused like the upstream `to` (400 "empty to") and
        like an empty uid inside a `to` array; so is an empty sender, with or
        without an idempotency key."""
        self.assert_error(self.call('POST', '/v1/messages', '{"to":"","data":1}'), 400)
        for body in ('{"from":"","to":"a","data":1}', '{"from":"","to":"a","cid":"k","data":1}'):
            with self.subTest(body=body):
                r = self.call('POST', '/v1/messages', body)
                self.assert_error(r, 400)
                self.assertEqual(r.json['error'], 'from must be a non-empty string')

    def test_keep_alive(self):
        import http.client
        conn = http.client.HTTPConnection('127.0.0.1', self.srv.http, timeout=T)
        try:
            statuses, sock = [], None
            for method, path, body in (('GET', '/healthz', None), ('GET', '/v1/nothing', None),
                                       ('POST', '/v1/messages', '{"to":"ka","data":1}'),
                                       ('GET', '/v1/messages', None), ('GET', '/metrics', None),
                                       ('POST', '/v1/messages', '{"to":'),
                                       ('GET', '/v1/users/ka/presence', None)):
                r = http_call(self.srv.http, method, path, body, conn=conn)
                statuses.append(r.status)
                self.assertEqual(r.headers.get('connection'), 'keep-alive', (path, r))
                sock = sock or conn.sock
                self.assertIs(conn.sock, sock, 'the connection was not kept alive')
            self.assertEqual(statuses, [200, 404, 200, 405, 200, 400, 200])
        finally:
            conn.close()

    def test_pipelining(self):
        reqs = [request_bytes('GET', '/healthz', key=None),
                request_bytes('POST', '/v1/messages', b'{"to":"pl","data":"\xc3\xa9"}'),
                request_bytes('GET', '/v1/nothing'),
                request_bytes('GET', '/v1/users/pl/presence'),
                request_bytes('POST', '/v1/messages', key=API_KEY,
                              extra='Transfer-Encoding: chunked\r\n').replace(
                                  b'Content-Length: 0\r\n', b'') +
                b'6\r\n{"to":\r\n14\r\n["pl","x"],"data":7}\r\n0\r\n\r\n',
                request_bytes('GET', '/v1/messages', extra='Connection: close\r\n')]
        out = raw_http(self.srv.http, b''.join(reqs), len(reqs))
        self.assertEqual([r.status for r in out], [200, 200, 404, 200, 200, 405])
        self.assertEqual(out[4].json['delivered'], 0)
        self.assertEqual(out[0].json, {'status': 'ok'})
        self.assertEqual(out[1].json['delivered'], 0)
        self.assertEqual(out[3].json['uid'], 'pl')
        self.assertEqual(out[5].headers['connection'], 'close')

    def test_garbage_request_400(self):
        with socket.create_connection(('127.0.0.1', self.srv.http), timeout=T) as s:
            s.sendall(b'\x16\x03\x01\x02\x00 this is not HTTP\r\n\r\n')
            data = b''
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        self.assertTrue(data.startswith(b'HTTP/1.1 400'), data[:200])
        self.assertIn(b'\r\n\r\n{"error":', data)


class TestHttpLimits(ServerCase):
    server_args = ('--max-message', '1024')             # HTTP bodies: 4 * 1024 + 4096

    def test_body_over_limit_413(self):
        for body in (b'{"to":"a","data":"' + b'x' * 9000 + b'"}',
                     b'{"to":"a","data":"' + b'x' * 8200 + b'"}'):
            r, = raw_http(self.srv.http, request_bytes('POST', '/v1/messages', body), 1)
            self.assertEqual(r.status, 413, r)
            self.assertIn('error', json.loads(r.body))
        head = request_bytes('PUT', '/v1/groups/g/members', b'')
        head = head.replace(b'Content-Length: 0', b'Content-Length: 100000')
        r, = raw_http(self.srv.http, head, 1)
        self.assertEqual(r.status, 413, r)

    @scenario()
    async def test_data_over_max_message(self):
        c = await connect(self.srv, 'tcp', 'lim')
        big = '"%s"' % ('y' * 2000)
        r = await api(self.srv, 'POST', '/v1/messages', '{"to":"lim","data":%s}' % big)
        self.assertEqual(r.status, 413, r)
        r = await api(self.srv, 'POST', '/v1/messages', '{"to":"lim","data":"%s"}' % ('z' * 900))
        self.assertEqual((r.status, r.json['delivered']), (200, 1), r)
        await c.expect('msg', id=r.json['id'])
        ws = await connect(self.srv, 'json', 'lim2')
        await ws.send('msg', cid='big', to='lim', data=big)
        self.assertEqual(await ws.closed(), 1009)
        await c.barrier()


# ================================================================== metrics ===

class TestMetrics(ServerCase):
    @scenario()
    async def test_metrics(self):
        web = await connect(self.srv, 'json', 'mw', platform='web')
        ios = await connect(self.srv, 'query', 'mi', platform='ios')
        tcp = await connect(self.srv, 'tcp', 'mt', platform='desktop')
        await web.msg('1', '1', to='mi')
        await ios.expect('msg', data='1')
        await ios.msg('2', '2', to='mt')
        await tcp.expect('msg', data='2')
        for x in (web, tcp):
            await x.send('join', room='mroom', cid='j')
            await x.expect('ack', cid='j')
        await web.msg('3', '3', room='mroom')
        await api(self.srv, 'POST', '/v1/messages', {'to': 'mw', 'data': 4})
        for kind, tok in (('json', forge(py_token('mx', 'd1'))),
                          ('tcp', py_token('mx', 'd1', exp=int(time.time()) - 1))):
            c = await Client.open(self.srv.tcp if kind == 'tcp' else self.srv.ws, kind)
            await c.auth('mx', tok)
            await c.closed()
        r = await api(self.srv, 'GET', '/metrics')
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.ctype.startswith('text/plain'), r.ctype)
        text = r.body.decode()
        self.assertIn('# TYPE imd_messages_in_total counter', text)
        self.assertIn('# TYPE imd_connections_by_platform gauge', text)
        m = parse_metrics(text)
        want = {'imd_connections_by_platform{platform="web"}': 1,
                'imd_connections_by_platform{platform="ios"}': 1,
                'imd_connections_by_platform{platform="desktop"}': 1,
                'imd_connections': 3, 'imd_users_online': 3, 'imd_rooms': 1,
                'imd_messages_in_total{kind="direct"}': 2,
                'imd_messages_in_total{kind="group"}': 0,
                'imd_messages_in_total{kind="room"}': 1,
                'imd_messages_in_total{kind="http"}': 1,
                'imd_errors_total{kind="auth_invalid"}': 1,
                'imd_errors_total{kind="auth_expired"}': 1}
        self.assertEqual({k: m.get(k) for k in want}, want, text)
        self.assertGreaterEqual(m['imd_http_requests_total{code="2xx"}'], 1)
        self.assertGreaterEqual(m['imd_messages_out_total'], 4)
        await web.close()
        m = parse_metrics((await api(self.srv, 'GET', '/metrics')).body.decode())
        self.assertEqual(m['imd_connections_by_platform{platform="web"}'], 0)
        self.assertEqual(m['imd_connections_by_platform{platform="ios"}'], 1)


# =============================================================== robustness ===

class TestRobustness(ServerCase):
    @scenario(90)
    async def test_garbage_client_does_not_disturb_others(self):
        alice, bob = await self.client('json', 'alice'), await self.client('tcp', 'bob')
        ROUNDS = 150

        async def chat():
            for i in range(ROUNDS):
                s, r = (alice, bob) if i % 2 == 0 else (bob, alice)
                ack = await s.msg('c%d' % i, '{"i":%d}' % i, to=r.uid)
                await r.expect('msg', id=ack['id'], data='{"i":%d}' % i)
            return ROUNDS

        async def garbage():
            raw = await RawWS.connect(self.srv, self.uid('mallory'))
            for bad in (b'{"op":"msg",', b'\x00\x01 junk', b'{"op":"msg","cid":"x","to":5}'):
                raw.send(ws_frame(1, bad))
                m = await raw.json()
                self.assertEqual((m['op'], m['code']), ('error', 400), m)
            raw.send(ws_frame(9, b'hi'))                    # ping frame -> pong frame
            self.assertEqual(await raw.frame(), (10, b'hi'))
            raw.send(ws_frame(1, b'{"op":"ping"}', masked=False))
            self.assertEqual(await raw.close_code(), 1002)
            raw = await RawWS.connect(self.srv, self.uid('mallory'))
            raw.send(ws_frame(1, b'"\xff\xfe"'))             # invalid UTF-8 text
            self.assertEqual(await raw.close_code(), 1007)
            t = await self.client('tcp', 'mallory')
            await t.send_raw(b'\x00\x00\x00\x02\xff\x00')   # unknown op
            await t.expect('error', code=400)
            await t.barrier()
            await t.send_raw(b'\xff\xff\xff\xff')            # absurd frame length
            self.assertIsNotNone(await t.closed())
            r, w = await within(asyncio.open_connection('127.0.0.1', self.srv.ws))
            w.write(b'NOT A REQUEST\r\n\r\n')
            head = await within(r.read(), what='the refusal')
            self.assertTrue(head.startswith(b'HTTP/1.1 4'), head[:100])
            w.close()
            return 'done'

        self.assertEqual(await asyncio.gather(chat(), garbage()), [ROUNDS, 'done'])
        ack = await alice.msg('last', '"still fine"', to=bob.uid)
        await bob.expect('msg', id=ack['id'])


if __name__ == '__main__':
    imdclient_main()
