#!/usr/bin/python3
"""imd's session and abuse controls, with real clients: sessions end when
their token does (4410) unless refreshed in place, a longest token
lifetime, revocation through the HTTP API (4411, persisted), message rate
limits per connection and per uid (429, then 4290), the per-receiver quota,
the room policy, and regressions of two holes: a sync answer that would
shed its reader, and ACK+sync pairs forcing store commits.

Run:  IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_security.py

Same rules as test_imd.py: real sockets, every wait bounded, every imd exits
0 on SIGTERM with no sanitizer report.
"""
import asyncio
import os
import stat
import sys
import time
import unittest

import websockets

sys.dont_write_bytecode = True          # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (SECRET, T, Client, Imd, ImdCase, api, assert_clean_exit,  # noqa: E402
                       check, cli_token, connect, encode_bin, parse_metrics, py_token, run_cli,
                       scenario, tcp_frame, within)


async def auth_answer(srv, kind, uid, token, device='d1'):
    """Open a connection, send auth, return the answer (the client too)."""
    c = await Client.open(srv.tcp if kind == 'tcp' else srv.ws, kind)
    return c, await c.auth(uid, token, device)


async def metrics(srv):
    r = await api(srv, 'GET', '/metrics')
    check(r.status == 200, 'metrics: %r' % r)
    return parse_metrics(r.body.decode())


# ============================================================ expiry ===

class TestSessionExpiry(ImdCase):
    @scenario()
    async def test_closed_when_the_token_expires(self):
        for kind in ('json', 'tcp'):
            exp = int(time.time()) + 2
            c = await self.client(kind, 'u-' + kind, token=py_token(self.uid('u-' + kind), 'd1',
                                                                     exp))
            code = await within(c.closed(), 10, 'the close at expiry')
            self.assertEqual(code, 4410, kind)
            # not before the token's expiry (the engine ticks every 100 ms)
            self.assertGreaterEqual(time.time(), exp - 0.2, kind)

    @scenario()
    async def test_refresh_extends_the_session(self):
        uid = self.uid('u')
        exp1 = int(time.time()) + 3
        c = await self.client('json', 'u', token=py_token(uid, 'd1', exp1))
        exp2 = exp1 + 2
        await c.send('auth', uid=uid, token=py_token(uid, 'd1', exp2, iat=int(time.time() * 1000)),
                     device='d1')
        m = await c.expect('auth_ok', 'the refresh answer')
        self.assertIn('conn', m)
        # still usable, and closed at the new expiry, not the old one
        ack = await c.msg('m1', '1', to=uid + '-peer')
        self.assertIn('id', ack)
        code = await within(c.closed(), 10, 'the close at the refreshed expiry')
        self.assertEqual(code, 4410)
        self.assertGreaterEqual(time.time(), exp2 - 0.2)

    @scenario()
    async def test_refresh_for_another_uid_or_bad_token_keeps_the_session(self):
        a = await self.client('bin', 'a')
        other = self.uid('b')
        await a.send('auth', uid=other, token=py_token(other, 'd1'), device='d1', cid='r1')
        await a.expect('error', code=403, reason='a refresh cannot change uid or device', cid='r1')
        await a.send('auth', uid=a.uid, token=py_token(a.uid, 'd2'), device='d2')
        await a.expect('error', code=403)
        await a.send('auth', uid=a.uid, token=py_token(a.uid, 'd1', int(time.time()) - 5),
                     device='d1')
        await a.expect('error', code=401, reason='token expired')
        await a.send('auth', token='1.2.d.' + 'A' * 43)   # uid and device default to the session's
        await a.expect('error', code=401, reason='invalid token')
        ack = await a.msg('still', '1', to=a.uid)
        self.assertIn('id', ack)
        await a.barrier()

    @scenario()
    async def test_default_refuses_tokens_over_30_days(self):
        uid = self.uid('u')
        c, m = await auth_answer(self.srv, 'json', uid,
                                 py_token(uid, 'd1', int(time.time()) + 31 * 86400))
        self.assertEqual((m['op'], m['code'], m['reason']),
                         ('error', 401, 'token lifetime too long'), m['_raw'])
        self.assertEqual(await c.closed(), 4401)
        await self.client('json', 'u', token=py_token(uid, 'd1', int(time.time()) + 29 * 86400))


class TestMaxTokenTtl(ImdCase):
    server_args = ('--max-token-ttl', '600')

    @scenario()
    async def test_lifetime_over_the_max_401(self):
        uid = self.uid('u')
        for kind in ('json', 'tcp'):
            c, m = await auth_answer(self.srv, kind, uid, py_token(uid, 'd1',
                                                                   int(time.time()) + 3600))
            self.assertEqual((m['op'], m['code'], m['reason']),
                             ('error', 401, 'token lifetime too long'), m['_raw'])
            self.assertEqual(await c.closed(), 4401)
        await self.client('tcp', 'u', token=py_token(uid, 'd1', int(time.time()) + 500))
        m = await metrics(self.srv)
        self.assertGreaterEqual(m['imd_errors_total{kind="auth_lifetime"}'], 2)

    def test_cli_does_not_mint_past_the_default_max(self):
        rc, out, err = run_cli('token', '--secret', SECRET, '--uid', 'u', '--ttl', '2592001')
        self.assertEqual(rc, 2, (out, err))
        self.assertIn('--ttl', err)
        rc, out, err = run_cli('token', '--secret', SECRET, '--uid', 'u', '--ttl', '2592000')
        self.assertEqual(rc, 0, err)

    def test_bad_values_refused_at_start(self):
        for v in ('59', '315360001', 'x'):
            rc, out, err = run_cli('--data', '/nonexistent-imd-dir', '--max-token-ttl', v)
            self.assertEqual(rc, 2, (v, out, err))
            self.assertIn('max-token-ttl', err)


# ========================================================== revocation ===

class TestRevoke(unittest.TestCase):
    @scenario(timeout=90)
    async def test_revoke_closes_refuses_old_tokens_and_survives_restart(self):
        srv = Imd()
        try:
            old_v2 = cli_token('alice', 'd1')
            old_v1 = py_token('alice', 'd2')
            ws = await connect(srv, 'json', 'alice', 'd1', token=old_v2)
            tcp = await connect(srv, 'tcp', 'alice', 'd2', token=old_v1)
            bob = await connect(srv, 'bin', 'bob')
            r = await api(srv, 'POST', '/v1/users/alice/revoke')
            self.assertEqual(r.status, 200, r)
            self.assertEqual((r.json['uid'], r.json['closed']), ('alice', 2), r)
            self.assertLessEqual(r.json['revoked_at'], time.time() * 1000)
            self.assertEqual(await ws.closed(), 4411)
            self.assertEqual(await tcp.closed(), 4411)
            for tok, dev in ((old_v2, 'd1'), (old_v1, 'd2'),
                             # a v1 token has no issue time: one that may have been issued
                             # before the revocation (exp - max lifetime <= it) is refused
                             (py_token('alice', 'd2'), 'd2')):
                c, m = await auth_answer(srv, 'json', 'alice', tok, dev)
                self.assertEqual((m['op'], m['code'], m['reason']),
                                 ('error', 401, 'token revoked'), m['_raw'])
            new = cli_token('alice', 'd1')
            a = await connect(srv, 'json', 'alice', 'd1', token=new)
            ack = await bob.msg('hi', '"hi"', to='alice')
            await a.expect('msg', id=ack['id'])
            m = await metrics(srv)
            self.assertEqual(m['imd_errors_total{kind="auth_revoked"}'], 3)
            self.assertEqual(m['imd_revocations_total'], 1)
            # a refresh with a revoked token is refused too; the session stays
            await a.send('auth', token=old_v2)
            await a.expect('error', code=401, reason='token revoked')
            await a.barrier()
            # only the API key may revoke
            r = await api(srv, 'POST', '/v1/users/bob/revoke', key='not-the-key-0123456789')
            self.assertEqual(r.status, 401, r)
            r = await api(srv, 'GET', '/v1/users/bob/revoke')
            self.assertEqual(r.status, 405, r)
            await bob.barrier()
            path = os.path.join(srv.data, 'revoked')
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            rc, log = srv.stop()
            assert_clean_exit(rc, log)
            srv = Imd(data=srv.data)
            srv.own_data = True
            c, m = await auth_answer(srv, 'tcp', 'alice', old_v2, 'd1')
            self.assertEqual((m['op'], m['code'], m['reason']),
                             ('error', 401, 'token revoked'), m['_raw'])
            await connect(srv, 'tcp', 'alice', 'd1', token=new)
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            assert_clean_exit(rc, log)


# ========================================================= rate limits ===

async def flood(c, n, to, prefix):
    """Send n msgs without waiting, then read the n answers: (acked cids,
    refused cids)."""
    for i in range(n):
        await c.send('msg', cid='%s%d' % (prefix, i), to=to, data='%d' % i)
    acked, refused = [], []
    while len(acked) + len(refused) < n:
        m = await c.recv('the answers')
        if m['op'] == 'msg':
            continue        # a copy of what the uid's other connection sent (R7)
        if m['op'] == 'ack':
            acked.append(m['cid'])
        else:
            check(m['op'] == 'error' and m['code'] == 429 and
                  m['reason'] == 'rate limit exceeded' and m.get('cid'),
                  'expected ack or 429: %r' % m['_raw'])
            refused.append(m['cid'])
    return acked, refused


async def drain_msgs(c):
    """Messages queued for c until a ping is answered."""
    got = []
    await c.send('ping')
    while True:
        m = await c.recv('msgs, then the pong')
        if m['op'] == 'pong':
            return got
        check(m['op'] == 'msg', 'unexpected %r' % m['_raw'])
        got.append(m)


class TestRateLimit(ImdCase):
    server_args = ('--rate-msgs', '10', '--rate-user-msgs', '12', '--rate-strikes', '1000',
                   '--rate-receiver', '0')

    @scenario()
    async def test_flood_gets_429_and_nothing_is_stored(self):
        a = await self.client('json', 'a')
        bob = await self.client('bin', 'bob')
        m0 = await metrics(self.srv)
        t0 = time.monotonic()
        acked, refused = await flood(a, 60, bob.uid, 'f')
        secs = time.monotonic() - t0
        # a burst of 2 x 10 passes at once, then 10 a second
        self.assertGreaterEqual(len(acked), 20)
        self.assertLessEqual(len(acked), 20 + 12 * secs + 1)
        self.assertEqual(len(acked) + len(refused), 60)
        got = await drain_msgs(bob)
        self.assertEqual(len(got), len(acked))
        r = await api(self.srv, 'GET', '/v1/users/%s/inbox' % bob.uid)
        self.assertEqual(r.json['last'], len(acked), r)
        # another user is not affected
        carol = await self.client('tcp', 'carol')
        ack = await carol.msg('c1', '1', to=bob.uid)
        await bob.expect('msg', id=ack['id'])
        m1 = await metrics(self.srv)
        self.assertEqual(m1['imd_rate_limited_total{limit="rate"}'] -
                         m0['imd_rate_limited_total{limit="rate"}'], len(refused))

    @scenario()
    async def test_per_uid_across_connections(self):
        # each connection stays inside its own burst of 20; together they
        # exceed the uid's burst of 24
        c1 = await self.client('json', 'a', device='d1')
        c2 = await self.client('tcp', 'a', device='d2')
        t0 = time.monotonic()
        (a1, r1), (a2, r2) = await asyncio.gather(flood(c1, 20, self.uid('x'), 'p'),
                                                  flood(c2, 20, self.uid('x'), 'q'))
        secs = time.monotonic() - t0
        self.assertLessEqual(len(a1) + len(a2), 24 + 12 * secs + 1)
        self.assertGreaterEqual(len(r1) + len(r2), 1)
        # a fresh uid's single connection may send its burst of 20 at once
        solo = await self.client('bin', 'solo')
        acked, refused = await flood(solo, 20, self.uid('x'), 's')
        self.assertEqual((len(acked), refused), (20, []))


class TestRateStrikes(ImdCase):
    server_args = ('--rate-msgs', '5', '--rate-strikes', '10', '--rate-receiver', '0')

    @scenario()
    async def test_persistent_excess_closes_4290(self):
        m0 = await metrics(self.srv)
        for kind in ('json', 'tcp'):
            c = await self.client(kind, 'a-' + kind)
            try:
                if kind == 'tcp':
                    # one write: the server reads it all before it closes, so
                    # no reset can discard its answer
                    await c.send_raw(b''.join(
                        tcp_frame(encode_bin('msg', cid='f%d' % i, to=self.uid('x'), data='1'))
                        for i in range(40)))
                else:
                    for i in range(40):
                        await c.send('msg', cid='f%d' % i, to=self.uid('x'), data='1')
            except (ConnectionError, websockets.exceptions.ConnectionClosed):
                pass        # closed while we were still sending: what is tested
            self.assertEqual(await within(c.closed(), 10), 4290, kind)
        m = await metrics(self.srv)
        self.assertEqual(m['imd_rate_closed_total'] - m0.get('imd_rate_closed_total', 0), 2)
        ok = await self.client('bin', 'other')
        await ok.msg('m', '1', to=self.uid('x'))

    @scenario()
    async def test_a_client_still_sending_learns_why(self):
        """A client authenticated at the upgrade writes 3000 msgs at once:
        its rate close comes while most of them are unread. The server reads
        and drops the rest (a lingering close) instead of closing a socket
        with unread input, whose reset made the client's pending writes fail
        and its library report 1006 before it read the close frame."""
        uid = self.uid('hose')
        ws = await within(websockets.connect(
            'ws://127.0.0.1:%d/ws?uid=%s&token=%s' % (self.srv.ws, uid, py_token(uid)),
            subprotocols=['imp.json'], ping_interval=None, max_queue=None))
        try:
            for i in range(3000):
                await ws.send('{"op":"msg","cid":"h%d","to":"%s","data":"%s"}'
                              % (i, self.uid('x'), 'y' * 200))
        except websockets.exceptions.ConnectionClosed:
            pass
        await within(ws.wait_closed(), 10, 'the close')
        self.assertEqual(ws.close_code, 4290)


class TestReceiverQuota(ImdCase):
    server_args = ('--rate-receiver', '5')

    @scenario()
    async def test_one_sender_cannot_flood_an_inbox(self):
        m0 = await metrics(self.srv)
        a = await self.client('json', 'a')
        bob = await self.client('bin', 'bob')
        codes = []
        for i in range(8):
            await a.send('msg', cid='q%d' % i, to=bob.uid, data='%d' % i)
            m = await a.recv('the answer')
            codes.append(m['op'] if m['op'] == 'ack' else (m['code'], m['reason'], m['cid']))
        self.assertEqual(codes, ['ack'] * 5 + [(429, 'receiver quota exceeded', 'q%d' % i)
                                               for i in (5, 6, 7)])
        # the same sender to someone else, and someone else to bob: fine
        await a.msg('other', '1', to=self.uid('carol'))
        d = await self.client('tcp', 'dave')
        ack = await d.msg('d1', '1', to=bob.uid)
        got = await drain_msgs(bob)
        self.assertEqual(len(got), 6)
        self.assertEqual(got[-1]['id'], ack['id'])
        r = await api(self.srv, 'GET', '/v1/users/%s/inbox' % bob.uid)
        self.assertEqual(r.json['last'], 6, r)
        m = await metrics(self.srv)
        self.assertEqual(m['imd_rate_limited_total{limit="receiver_quota"}'] -
                         m0['imd_rate_limited_total{limit="receiver_quota"}'], 3)

    @scenario()
    async def test_a_group_counts_as_one_receiver(self):
        a = await self.client('json', 'a')
        b = await self.client('tcp', 'b')
        g = self.uid('g')
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g, {'add': [a.uid, b.uid]})
        self.assertEqual(r.status, 200, r)
        answers = []
        for i in range(6):
            await a.send('msg', cid='g%d' % i, group=g, data='%d' % i)
            while True:
                m = await a.recv('the answer')
                if m['op'] != 'msg':
                    break
            answers.append(m['op'] if m['op'] == 'ack' else (m['code'], m['reason']))
        self.assertEqual(answers, ['ack'] * 5 + [(429, 'receiver quota exceeded')])
        self.assertEqual(len(await drain_msgs(b)), 5)
        # 1:1 to a member is another receiver: not counted with the group
        await a.msg('direct', '1', to=b.uid)


# =============================================================== rooms ===

class TestRoomsOpen(ImdCase):
    @scenario()
    async def test_anyone_joins(self):
        c = await self.client('json', 'a')
        await c.send('join', room=self.uid('any'), cid='j')
        await c.expect('ack', cid='j')


class TestRoomsMembers(ImdCase):
    server_args = ('--rooms', 'members')

    @scenario()
    async def test_only_group_members_join(self):
        g = self.uid('g')
        a = await self.client('json', 'a')
        b = await self.client('tcp', 'b')
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g, {'add': [a.uid]})
        self.assertEqual(r.status, 200, r)
        await a.send('join', room=g, cid='j1')
        await a.expect('ack', cid='j1')
        for room in (g, self.uid('nogroup')):
            await b.send('join', room=room, cid='j2')
            await b.expect('error', code=403, reason='not a member of the group', cid='j2')
        # b is not in the room: it gets nothing sent there, and cannot send
        ack = await a.msg('r1', '"hello"', room=g)
        self.assertIn('id', ack)
        await b.send('msg', cid='r2', room=g, data='1')
        await b.expect('error', code=403, cid='r2')
        await b.barrier()
        # leaving is always allowed; a join without cid is answered by nothing
        await b.send('leave', room=g, cid='l')
        await b.expect('ack', cid='l')
        await a.send('join', room=g)
        await a.barrier()
        m = await metrics(self.srv)
        self.assertEqual(m['imd_room_joins_refused_total'], 2)


# ================================================= regression: holes ===

class TestSyncPoisoning(ImdCase):
    @scenario(timeout=120)
    async def test_twenty_60k_messages_do_not_lock_the_receiver_out(self):
        a = await self.client('tcp', 'a')
        bob = self.uid('bob')
        data = '"%s"' % ('x' * 60000)
        for i in range(20):
            await a.msg('big%d' % i, data, to=bob)
        for kind in ('json', 'tcp'):
            c = await Client.open(self.srv.tcp if kind == 'tcp' else self.srv.ws, kind)
            await c.send('auth', uid=bob, token=py_token(bob, 'd1'), device='d1', since=0)
            await c.expect('auth_ok')
            seqs, pages = [], 0
            while True:
                m = await c.recv('the sync answer')
                if m['op'] == 'msg':
                    self.assertEqual(len(m['data']), len(data))
                    seqs.append(m['seq'])
                    continue
                self.assertEqual(m['op'], 'sync_end', m['_raw'][:200])
                pages += 1
                if not m['more']:
                    break
                await c.send('sync', since=m['last'])
            self.assertEqual(seqs, list(range(1, 21)), kind)
            self.assertGreater(pages, 1, kind)   # cut at the byte budget
            await c.barrier()


class TestAckSyncStorm(ImdCase):
    # the latency probe sends as fast as it is answered: no rate limits
    server_args = ('--rate-receiver', '0', '--rate-msgs', '0', '--rate-user-msgs', '0')

    @scenario(timeout=180)
    async def test_ack_sync_pairs_do_not_force_commits(self):
        a = await self.client('json', 'a')
        bob = await self.client('bin', 'bob')
        ack = await a.msg('one', '1', to=bob.uid)
        await bob.expect('msg', id=ack['id'])
        carol = await self.client('tcp', 'carol')
        dave = await self.client('json', 'dave')
        m0 = await metrics(self.srv)
        pairs, batch = 2000, 100
        stop = False

        async def storm():
            for b0 in range(0, pairs, batch):
                for i in range(b0, b0 + batch):
                    await bob.send('ack', id=ack['id'], seq=i + 2)   # past bob's last seq
                    await bob.send('sync', since=0, limit=1)
                n = 0
                while n < batch:
                    m = await bob.recv('the sync answers')
                    n += m['op'] == 'sync_end'

        async def latency():
            worst, i = 0.0, 0
            while not stop:
                t0 = time.monotonic()
                k = await carol.msg('l%d' % i, '1', to=dave.uid)
                m = await dave.expect('msg', id=k['id'])
                await dave.send('ack', id=m['id'], seq=m['seq'])   # keep its window open
                worst = max(worst, time.monotonic() - t0)
                i += 1
            return worst, i

        lat = asyncio.ensure_future(latency())
        await within(storm(), 150, 'the storm')
        stop = True
        worst, rounds = await within(lat, 30, 'the latency probe')
        m1 = await metrics(self.srv)
        commits = m1['imd_store_commits_total'] - m0['imd_store_commits_total']
        sys.stderr.write('[ack+sync storm: %d pairs, %d commits, %d probe round trips, '
                         'worst %.3f s] ' % (pairs, commits, rounds, worst))
        # the probe's own messages are commits too: one each at most
        self.assertLess(commits - rounds, pairs / 20, (commits, rounds))
        self.assertGreater(rounds, 0)
        self.assertLess(worst, 2.0)
        # the delivered mark was cut to bob's last seq
        r = await api(self.srv, 'GET', '/v1/users/%s/inbox' % bob.uid)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json['last'], 1, r)
        self.assertEqual([d['delivered'] for d in r.json['devices']], [1], r)


if __name__ == '__main__':
    unittest.main(verbosity=2)
