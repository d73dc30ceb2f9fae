#!/usr/bin/python3
"""Reliable delivery in imd, end to end: per-user seq, the durable inbox,
sync, retransmits, idempotent resends, retention, and fault tests with real
processes (ACKs dropped, random disconnects, kill -9 in a send burst, a
device offline during a burst).

Run:  IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_delivery.py

The fault tests print their figures (sent, acked, delivered, duplicates,
lost) on stdout as lines starting with "FIGURES".
"""
import asyncio
import os
import random
import sqlite3
import sys
import tempfile
import unittest

import websockets

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (Client, Imd, ImdCase, api, assert_clean_exit, check,  # noqa: E402
                       connect, parse_metrics, py_token, scenario, within, NO_RATE_LIMITS)
import wire  # noqa: E402

PLATFORM = {'json': 'web', 'bin': 'android', 'tcp': 'desktop'}


class Receiver:
    """A device that keeps what it got by seq, syncs from its contiguous
    position on (re)connect, and ACKs (or, on purpose, does not)."""

    def __init__(self, srv, uid, device, kind='json'):
        self.srv, self.uid, self.device, self.kind = srv, uid, device, kind
        self.by_seq = {}          # seq -> (id, data)
        self.copies = 0           # msgs received, duplicates included
        self.c = None

    def contiguous(self):
        n = 0
        while n + 1 in self.by_seq:
            n += 1
        return n

    def take(self, m):
        check(m['op'] == 'msg' and m.get('seq', 0) > 0, 'not a stored msg: %r' % m['_raw'][:200])
        self.copies += 1
        old = self.by_seq.get(m['seq'])
        check(old is None or old == (m['id'], m['data']),
              'seq %d changed: %r then %r' % (m['seq'], old, (m['id'], m['data'])))
        self.by_seq[m['seq']] = (m['id'], m['data'])

    async def connect(self, since=None):
        """Authenticate, asking for what came after `since` (default: the
        contiguous position) in the same round trip; returns after the
        first sync_end."""
        port = self.srv.tcp if self.kind == 'tcp' else self.srv.ws
        self.c = await Client.open(port, self.kind)
        self.c.uid = self.uid
        await self.c.send('auth', uid=self.uid, token=py_token(self.uid, self.device),
                          device=self.device, platform=PLATFORM[self.kind],
                          since=self.contiguous() if since is None else since)
        m = await self.c.recv('auth_ok')
        check(m['op'] == 'auth_ok', 'auth failed: %r' % m['_raw'][:200])
        return await self.drain_sync()

    async def drain_sync(self, ack=True):
        """Read msgs up to sync_end, syncing on while it says more; ACK the
        last seq of each page. Returns the final sync_end."""
        while True:
            m = await self.c.recv('a synced msg or sync_end')
            if m['op'] == 'msg':
                self.take(m)
                continue
            check(m['op'] == 'sync_end', 'expected sync_end, got %r' % m['_raw'][:200])
            if ack and m['last']:
                id_ = self.by_seq.get(m['last'], ('x',))[0]
                await self.c.send('ack', id=id_, seq=m['last'])
            if not m['more']:
                return m
            await self.c.send('sync', since=m['last'])

    def abort(self):
        t = self.c.w.transport if self.kind == 'tcp' else self.c.ws.transport
        t.abort()


class Sender:
    """A device that sends numbered messages with cids and collects acks."""

    def __init__(self, client, to):
        self.c, self.to, self.acks = client, to, {}

    async def burst(self, cids, window=64):
        """Send every cid (data {"i":n}) with at most `window` unacked."""
        pending = set()
        it = iter(cids)
        done = False
        while not done or pending:
            while not done and len(pending) < window:
                cid = next(it, None)
                if cid is None:
                    done = True
                    break
                await self.c.send('msg', cid=cid, to=self.to, data='{"i":%s}' % cid[1:])
                pending.add(cid)
            if pending:
                m = await self.c.recv('an ack')
                check(m['op'] == 'ack', 'expected ack, got %r' % m['_raw'][:200])
                self.acks[m['cid']] = (m['id'], m.get('seq'))
                pending.discard(m['cid'])


def cids(n, start=0):
    return ['c%d' % i for i in range(start, start + n)]


def figures(name, **kw):
    print('FIGURES %s %s' % (name, ' '.join('%s=%s' % kv for kv in kw.items())), flush=True)


class DeliveryCase(ImdCase):
    server_args = ('--ack-timeout', '300', '--ack-retries', '2', *NO_RATE_LIMITS)


class TestSeqAndSync(DeliveryCase):
    @scenario()
    async def test_seq_per_user_and_ack_seq(self):
        a = await connect(self.srv, 'json', self.uid('alice'))
        b = await connect(self.srv, 'bin', self.uid('bob'))
        for i in range(1, 4):
            ack = await a.msg('m%d' % i, '{"n":%d}' % i, to=b.uid)
            self.assertEqual(ack['seq'], i)          # the sender's own inbox seq
            m = await b.expect('msg', id=ack['id'], seq=i, data='{"n":%d}' % i)
            await b.send('ack', id=m['id'], seq=m['seq'])
        # bob replies: his inbox goes on at 4, alice's at 4
        ack = await b.msg('r1', '"hi"', to=a.uid)
        self.assertEqual(ack['seq'], 4)
        await a.expect('msg', id=ack['id'], seq=4)
        r = await api(self.srv, 'GET', '/v1/users/%s/inbox' % b.uid)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json['last'], 4)
        self.assertEqual(r.json['devices'], [{'device': 'd1', 'delivered': 3}])

    @scenario()
    async def test_offline_inbox_synced_at_auth(self):
        a = await connect(self.srv, 'tcp', self.uid('alice'))
        acks = [await a.msg('o%d' % i, '{"i":%d}' % i, to=self.uid('bob')) for i in range(5)]
        for kind in ('json', 'tcp'):
            bob = Receiver(self.srv, self.uid('bob'), 'dev-' + kind, kind)
            end = await bob.connect(since=0)
            self.assertEqual((end['last'], end['more']), (5, False))
            self.assertNotIn('gap', end)
            self.assertEqual([bob.by_seq[s][0] for s in range(1, 6)], [k['id'] for k in acks])
            self.assertEqual([bob.by_seq[s][1] for s in range(1, 6)],
                             ['{"i":%d}' % i for i in range(5)])

    @scenario()
    async def test_sync_pages(self):
        a = await connect(self.srv, 'json', self.uid('alice'))
        for i in range(7):
            await a.msg('p%d' % i, '%d' % i, to=self.uid('bob'))
        b = await connect(self.srv, 'json', self.uid('bob'))
        got = []
        since = 2
        while True:
            await b.send('sync', since=since, limit=2)
            while True:
                m = await b.recv()
                if m['op'] != 'msg':
                    break
                got.append((m['seq'], m['data']))
            self.assertEqual(m['op'], 'sync_end')
            self.assertEqual(m['more'], m['last'] < 7, m)
            since = m['last']
            if not m['more']:
                break
        self.assertEqual(got, [(s, '%d' % (s - 1)) for s in range(3, 8)])
        await b.send('sync', since=7)                # nothing new
        await b.expect('sync_end', last=7, more=False)

    @scenario()
    async def test_client_ahead_of_inbox_is_told(self):
        a = await connect(self.srv, 'json', self.uid('alice'))
        await a.msg('z', '"one"', to=self.uid('bob'))
        bob = Receiver(self.srv, self.uid('bob'), 'd1')
        end = await bob.connect(since=50)            # e.g. the server was restored
        self.assertEqual((end['last'], end['more']), (1, False))
        self.assertEqual(bob.by_seq, {})

    @scenario()
    async def test_resend_after_reconnect_is_idempotent(self):
        a = await connect(self.srv, 'json', self.uid('alice'), device='phone')
        first = await a.msg('same', '"once"', to=self.uid('bob'))
        await a.close()
        a = await connect(self.srv, 'bin', self.uid('alice'), device='phone')
        again = await a.msg('same', '"once"', to=self.uid('bob'))
        self.assertEqual(again['id'], first['id'])
        # another device of alice may use the same cid for another message
        t = await connect(self.srv, 'tcp', self.uid('alice'), device='tablet')
        other = await t.msg('same', '"other"', to=self.uid('bob'))
        self.assertNotEqual(other['id'], first['id'])
        bob = Receiver(self.srv, self.uid('bob'), 'd1')
        await bob.connect(since=0)
        self.assertEqual(sorted(bob.by_seq), [1, 2])
        self.assertEqual([bob.by_seq[1][1], bob.by_seq[2][1]], ['"once"', '"other"'])

    @scenario()
    async def test_group_stored_per_member(self):
        g = self.uid('g')
        members = [self.uid(n) for n in ('a', 'b', 'c')]
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g, {'add': members})
        self.assertEqual(r.status, 200, r)
        a = await connect(self.srv, 'json', members[0])
        b = await connect(self.srv, 'json', members[1])
        ack = await a.msg('g1', '"to all"', group=g)
        m = await b.expect('msg', id=ack['id'], group=g, seq=1)
        c = Receiver(self.srv, members[2], 'd1')       # offline until now
        await c.connect(since=0)
        self.assertEqual(c.by_seq, {1: (ack['id'], '"to all"')})
        self.assertEqual(m['from'], members[0])

    @scenario()
    async def test_http_push_stored_and_idempotent(self):
        bob = self.uid('bob')
        body = {'from': 'system', 'to': bob, 'cid': 'billing-1', 'data': {'amount': 5}}
        r1 = await api(self.srv, 'POST', '/v1/messages', body)
        self.assertEqual((r1.status, r1.json['delivered'], r1.json['stored']), (200, 0, 1), r1)
        r2 = await api(self.srv, 'POST', '/v1/messages', body)
        self.assertEqual((r2.status, r2.json['id'], r2.json.get('duplicate')),
                         (200, r1.json['id'], True), r2)
        rx = Receiver(self.srv, bob, 'd1')
        await rx.connect(since=0)
        self.assertEqual(rx.by_seq, {1: (r1.json['id'], '{"amount": 5}')})  # data passed byte for byte
        r = await api(self.srv, 'POST', '/v1/messages',
                      {'room': 'r', 'cid': 'x', 'data': 1})
        self.assertEqual(r.status, 400, r)

    @scenario()
    async def test_rooms_are_not_stored(self):
        a = await connect(self.srv, 'json', self.uid('a'))
        b = await connect(self.srv, 'json', self.uid('b'))
        for c in (a, b):
            await c.send('join', room=self.uid('r'), cid='j')
            await c.expect('ack', cid='j')
        ack = await a.msg('rm', '"ephemeral"', room=self.uid('r'))
        m = await b.expect('msg', id=ack['id'])
        self.assertNotIn('seq', m)
        self.assertNotIn('seq', ack)
        await b.send('sync', since=0)
        await b.expect('sync_end', last=0, more=False)


def vacuum_into(src_path, dest):
    """docs/OPERATIONS.md's backup: a consistent copy of a live store, made
    from one read snapshot by SQLite itself (another connection than imd's)."""
    src = sqlite3.connect(src_path, timeout=10)
    try:
        src.execute('VACUUM INTO ?', (dest,))
    finally:
        src.close()


class TestOnlineBackup(DeliveryCase):
    @scenario()
    async def test_vacuum_into_while_storing(self):
        """A backup taken while imd stores messages: the copy is intact and
        holds every message acked before it began, each inbox gap-free; imd
        stores on meanwhile and loses nothing."""
        bob = self.uid('bob')
        s = Sender(await connect(self.srv, 'tcp', self.uid('alice')), bob)
        await s.burst(cids(2000))
        before = {s.acks[c][0] for c in cids(2000)}
        n = 2000
        with tempfile.TemporaryDirectory() as d:
            dest = os.path.join(d, 'copy.db')
            job = asyncio.ensure_future(
                asyncio.to_thread(vacuum_into, os.path.join(self.srv.data, 'imd.db'), dest))
            while not job.done():          # imd keeps storing during the copy
                await s.burst(cids(50, n))
                n += 50
            await job
            db = sqlite3.connect(dest)
            try:
                self.assertEqual(db.execute('PRAGMA integrity_check').fetchone()[0], 'ok')
                ids = {r[0] for r in db.execute('SELECT id FROM msgs')}
                self.assertLessEqual(before, ids)
            finally:
                db.close()
            # restored: an imd on the copy (the inbox entries that still
            # waited in imd's memory come back from their messages' rows)
            rd = os.path.join(d, 'restore')
            os.mkdir(rd)
            os.rename(dest, os.path.join(rd, 'imd.db'))
            restored = Imd(*NO_RATE_LIMITS, data=rd)
            try:
                copy = Receiver(restored, bob, 'restore')
                end = await copy.connect(since=0)
                self.assertGreaterEqual(end['last'], 2000)
                self.assertEqual(copy.contiguous(), end['last'])
                self.assertLessEqual(before, {copy.by_seq[q][0]
                                              for q in range(1, end['last'] + 1)})
            finally:
                restored.stop()
        r = Receiver(self.srv, bob, 'phone')
        end = await r.connect(since=0)
        self.assertEqual(end['last'], n)
        self.assertEqual(r.contiguous(), n)
        self.assertEqual({r.by_seq[q][0] for q in range(1, n + 1)},
                         {s.acks[c][0] for c in cids(n)})
        # a few MiB of WAL, far under its bound: no commit waited for a checkpoint
        m = parse_metrics((await api(self.srv, 'GET', '/metrics')).body.decode())
        self.assertEqual(m['imd_store_wal_waits_total'], 0, m)
        self.assertEqual(m['imd_store_checkpoints_cut_total'], 0, m)
        self.assertEqual(m['imd_store_errors_total'], 0, m)


class TestRetransmit(DeliveryCase):
    @scenario()
    async def test_unacked_push_is_resent_then_4408(self):
        a = await connect(self.srv, 'json', self.uid('alice'))
        b = await connect(self.srv, 'tcp', self.uid('bob'))
        ack = await a.msg('x', '"hello"', to=b.uid)
        first = await b.expect('msg', id=ack['id'], seq=1)
        again = await b.expect('msg', 'the resend', id=ack['id'], seq=1)   # 300 ms later
        self.assertEqual(again['_raw'], first['_raw'])
        await b.expect('msg', 'the 2nd resend', id=ack['id'])
        self.assertEqual(await b.closed(), 4408)
        # still in the inbox: the next connection gets it by sync
        rx = Receiver(self.srv, b.uid, 'd1')
        await rx.connect(since=0)
        self.assertEqual(rx.by_seq, {1: (ack['id'], '"hello"')})

    @scenario()
    async def test_acked_push_is_not_resent(self):
        a = await connect(self.srv, 'json', self.uid('alice'))
        b = await connect(self.srv, 'json', self.uid('bob'))
        ack = await a.msg('y', '"once"', to=b.uid)
        m = await b.expect('msg', id=ack['id'])
        await b.send('ack', id=m['id'], seq=m['seq'])
        await asyncio.sleep(1.0)    # three ack timeouts: a resend would have come by now
        await b.barrier('no resend of an ACKed message')


class TestAckLatencyMetric(DeliveryCase):
    @scenario()
    async def test_ack_latency_histogram(self):
        """imd_ack_latency_seconds counts each ACK of a reliable push once, in
        cumulative buckets, and not an ack of nothing in flight."""
        async def histogram():
            r = await api(self.srv, 'GET', '/metrics')
            self.assertEqual(r.status, 200)
            text = r.body.decode()
            self.assertIn('# TYPE imd_ack_latency_seconds histogram', text)
            m = parse_metrics(text)
            buckets = [(float(k.split('"')[1]), v) for k, v in m.items()
                       if k.startswith('imd_ack_latency_seconds_bucket{le=')]
            buckets.sort()
            return (m['imd_ack_latency_seconds_count'], m['imd_ack_latency_seconds_sum'],
                    buckets)

        count0, sum0, _ = await histogram()
        a = await connect(self.srv, 'json', self.uid('alice'))
        b = await connect(self.srv, 'tcp', self.uid('bob'))
        for i in range(3):
            ack = await a.msg('l%d' % i, '%d' % i, to=b.uid)
            m = await b.expect('msg', id=ack['id'])
            await b.send('ack', id=m['id'], seq=m['seq'])
        await b.send('ack', id='not-in-flight', seq=99)
        await b.barrier('the pong after the acks')   # imd has read every ack
        count, total, buckets = await histogram()
        self.assertEqual(count - count0, 3)
        self.assertGreater(total, sum0)
        self.assertLess(total - sum0, 3 * 0.3)       # each under --ack-timeout (no resend)
        bounds = [le for le, _ in buckets]
        self.assertEqual(bounds[-1], float('inf'))
        self.assertEqual(bounds, sorted(set(bounds)))
        counts = [v for _, v in buckets]
        self.assertEqual(counts, sorted(counts), 'buckets are cumulative')
        self.assertEqual(counts[-1], count)
        under_1s = dict(buckets)[1.0]
        self.assertEqual(under_1s, count)            # all three came within a second


class TestRetention(unittest.TestCase):
    @scenario()
    async def test_count_limit_trims_and_sync_reports_gap(self):
        srv = Imd()
        try:
            a = await connect(srv, 'json', 'alice')
            acks = [await a.msg('k%d' % i, '%d' % i, to='bob') for i in range(5)]
            rc, log = srv.stop()
            assert_clean_exit(rc, log)
            # restarted with a smaller inbox: retention runs at start
            srv = Imd('--inbox-max', '3', data=srv.data)
            srv.own_data = True
            bob = Receiver(srv, 'bob', 'd1')
            end = await bob.connect(since=0)
            self.assertEqual((end['last'], end['more'], end.get('gap')), (5, False, True), end)
            self.assertEqual(sorted(bob.by_seq), [3, 4, 5])
            self.assertEqual(bob.by_seq[3][0], acks[2]['id'])
            await bob.c.send('sync', since=end['last'])   # from 5: nothing missing, no gap
            end = await bob.drain_sync()
            self.assertNotIn('gap', end)
            # bob's acks wait in memory as one mark, until a read of the marks
            m = parse_metrics((await api(srv, 'GET', '/metrics')).body.decode())
            self.assertEqual(m['imd_store_marks_pending'], 1, m)
            self.assertGreaterEqual(m['imd_store_retention_steps_total'], 1, m)  # at start
            self.assertEqual(m['imd_inbox_trimmed_total'], 4, m)  # bob's 2, alice's 2
            r = await api(srv, 'GET', '/v1/users/bob/inbox')
            self.assertEqual((r.json['last'], r.json['trimmed']), (5, 2), r)
            self.assertEqual(r.json['devices'], [{'device': 'd1', 'delivered': 5}], r)
            m = parse_metrics((await api(srv, 'GET', '/metrics')).body.decode())
            self.assertEqual(m['imd_store_marks_pending'], 0, m)
            # the idempotency key of a trimmed message still answers a late resend
            a = await connect(srv, 'json', 'alice')
            again = await a.msg('k0', '0', to='bob')
            self.assertEqual(again['id'], acks[0]['id'])
            r = await api(srv, 'GET', '/v1/users/bob/inbox')
            self.assertEqual(r.json['last'], 5, 'a resend was stored again')
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            assert_clean_exit(rc, log)


# ------------------------------------------------------------ fault tests ---

class TestFaults(unittest.TestCase):
    @scenario(240)
    async def test_dropped_acks_and_random_disconnects(self):
        """2,000 messages to a receiver that drops every 3rd ACK and
        disconnects at random: after its final sync it has every message
        exactly once, in order, seq gap-free."""
        srv = Imd('--ack-timeout', '200', '--ack-retries', '2', *NO_RATE_LIMITS)
        rnd = random.Random(20261121)
        N = 2000
        try:
            a = await connect(srv, 'json', 'alice')
            sender = Sender(a, 'bob')
            rx = Receiver(srv, 'bob', 'phone', 'tcp')
            await rx.connect(since=0)
            state = {'reconnects': 0, 'seen': 0, 'acks_dropped': 0, 'server_closes': 0}

            async def receive_until(sender_done):
                while not (sender_done.is_set() and rx.contiguous() == N):
                    try:
                        m = await rx.c.recv('a push', timeout=0.5)
                    except wire.Timeout:
                        continue
                    except (asyncio.IncompleteReadError, ConnectionError):
                        state['server_closes'] += 1  # closed by the server (4408)
                        await rx.connect()
                        state['reconnects'] += 1
                        continue
                    if m['op'] == 'error':
                        continue                    # the 4408 error op before EOF
                    if m['op'] == 'sync_end':
                        continue
                    rx.take(m)
                    state['seen'] += 1
                    if state['seen'] % 3 == 0:
                        state['acks_dropped'] += 1
                    else:
                        await rx.c.send('ack', id=m['id'], seq=m['seq'])
                    if rnd.random() < 0.01:         # a random disconnect
                        rx.abort()
                        await rx.connect()
                        state['reconnects'] += 1

            sender_done = asyncio.Event()
            task = asyncio.ensure_future(receive_until(sender_done))
            await sender.burst(cids(N), window=16)
            sender_done.set()
            await within(task, 120, 'the receiver to catch up')
            # the final sync, on a fresh connection
            rx.abort()
            end = await rx.connect()
            self.assertFalse(end.get('gap'))
            seqs = sorted(rx.by_seq)
            self.assertEqual(seqs, list(range(1, N + 1)), 'seq not gap-free')
            datas = [rx.by_seq[s][1] for s in seqs]
            self.assertEqual(datas, ['{"i":%d}' % i for i in range(N)], 'order or content')
            ids = [rx.by_seq[s][0] for s in seqs]
            self.assertEqual(len(set(ids)), N)
            self.assertEqual(sorted(v[0] for v in sender.acks.values()), sorted(ids))
            metrics = await api(srv, 'GET', '/metrics')
            self.assertEqual(metrics.status, 200)
            retrans = [ln for ln in metrics.body.decode().splitlines()
                       if ln.startswith('imd_retransmits_total ')]
            figures('dropped_acks', sent=N, acked=len(sender.acks), delivered=len(set(ids)),
                    copies_received=rx.copies, duplicates=rx.copies - N, lost=N - len(seqs),
                    acks_dropped=state['acks_dropped'], reconnects=state['reconnects'],
                    server_closes=state['server_closes'],
                    retransmits=retrans[0].split()[1] if retrans else '?')
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            assert_clean_exit(rc, log)

    @scenario(240)
    async def test_kill_9_mid_burst(self):
        """kill -9 while 1,000 messages are in flight; restart on the same data
        dir: every ACKed message is delivered, none twice."""
        N = 1000
        srv = Imd(*NO_RATE_LIMITS)
        data_dir = srv.data
        try:
            a = await connect(srv, 'json', 'alice', device='phone')
            acked_before, window, it = {}, set(), iter(cids(N))
            # up to 64 messages unacked at any time; SIGKILL at the 300th ack
            try:
                while True:
                    while len(window) < 64:
                        cid = next(it)
                        await a.send('msg', cid=cid, to='bob', data='{"i":%s}' % cid[1:])
                        window.add(cid)
                    m = await a.recv('an ack')
                    acked_before[m['cid']] = m['id']
                    window.discard(m['cid'])
                    if len(acked_before) == 300:
                        srv.proc.kill()
                        srv.proc.wait()
            except (asyncio.IncompleteReadError, ConnectionError, wire.Timeout,
                    websockets.exceptions.ConnectionClosed):
                pass                                    # the server is gone
            self.assertGreaterEqual(len(acked_before), 300)
            self.assertLess(len(acked_before), N)
            self.assertFalse(srv.alive())
            srv.kill()
            srv = Imd(*NO_RATE_LIMITS, data=data_dir)
            srv.own_data = True
            r = await api(srv, 'GET', '/v1/users/bob/inbox')
            stored_at_kill = r.json['last']
            self.assertGreaterEqual(stored_at_kill, len(acked_before), 'an ACKed message was lost')
            # the sender resends everything it has no ack for, plus a few it has
            a = await connect(srv, 'bin', 'alice', device='phone')
            resend = [c for c in cids(N) if c not in acked_before] + list(acked_before)[:20]
            s2 = Sender(a, 'bob')
            await s2.burst(resend)
            for cid in list(acked_before)[:20]:
                self.assertEqual(s2.acks[cid][0], acked_before[cid], 'a resend got a new id')
            bob = Receiver(srv, 'bob', 'pc')
            await bob.connect(since=0)
            datas = [bob.by_seq[s][1] for s in sorted(bob.by_seq)]
            got = [int(d[5:-1]) for d in datas]
            self.assertEqual(sorted(got), list(range(N)), 'lost or duplicated messages')
            self.assertEqual(sorted(bob.by_seq), list(range(1, N + 1)))
            ids = {bob.by_seq[s][1]: bob.by_seq[s][0] for s in bob.by_seq}
            for cid, id_ in acked_before.items():
                self.assertEqual(ids['{"i":%s}' % cid[1:]], id_)
            figures('kill9', sent=N, acked_before_kill=len(acked_before),
                    resent_after_restart=len(resend), delivered=len(got),
                    duplicates=len(got) - len(set(got)), lost=N - len(set(got)),
                    stored_at_kill=stored_at_kill,
                    stored_but_unacked_at_kill=stored_at_kill - len(acked_before))
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            assert_clean_exit(rc, log)

    @scenario(120)
    async def test_two_devices_one_offline(self):
        N = 500
        srv = Imd(*NO_RATE_LIMITS)
        try:
            a = await connect(srv, 'json', 'alice')
            phone = Receiver(srv, 'bob', 'phone', 'json')
            await phone.connect(since=0)

            async def phone_reads():
                while len(phone.by_seq) < N:
                    m = await phone.c.recv('a push')
                    phone.take(m)
                    await phone.c.send('ack', id=m['id'], seq=m['seq'])

            reader = asyncio.ensure_future(phone_reads())
            await Sender(a, 'bob').burst(cids(N))
            await within(reader, what='the phone to get all pushes')
            pc = Receiver(srv, 'bob', 'pc', 'tcp')     # was offline during the burst
            await pc.connect(since=0)
            want = ['{"i":%d}' % i for i in range(N)]
            for dev in (phone, pc):
                self.assertEqual(sorted(dev.by_seq), list(range(1, N + 1)))
                self.assertEqual([dev.by_seq[s][1] for s in range(1, N + 1)], want)
            self.assertEqual(phone.by_seq, pc.by_seq)
            r = await api(srv, 'GET', '/v1/users/bob/inbox')
            self.assertEqual(r.json['last'], N)
            delivered = {d['device']: d['delivered'] for d in r.json['devices']}
            self.assertEqual(delivered, {'phone': N, 'pc': N})
            figures('two_devices', sent=N, phone=len(phone.by_seq), pc=len(pc.by_seq),
                    phone_copies=phone.copies, lost=0)
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            assert_clean_exit(rc, log)


if __name__ == '__main__':
    if len(sys.argv) > 2 and sys.argv[1] == '--imd':
        os.environ['IMD'] = sys.argv.pop(2)
        sys.argv.pop(1)
    unittest.main(verbosity=2)
