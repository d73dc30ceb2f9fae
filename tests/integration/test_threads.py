#!/usr/bin/python3
"""imd --threads 2: two worker threads, each with its own listeners (one
port, SO_REUSEPORT) and connections, act as one server.

Clients are placed on both workers (a connection id carries its worker in
its 6 high bits; a client reconnects until the placement the test needs),
then exchange 1:1, group and room messages and HTTP pushes: every device
gets every message exactly once, in order, ids unique. Presence, kick and
/metrics see both workers. Every wait has a timeout; nothing sleeps.
"""
import asyncio
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (ImdCase, api, check, connect, parse_metrics, run_cli,  # noqa: E402
                       scenario, NO_RATE_LIMITS, SECRET)

N = 20


def worker_of(c):
    """The worker thread a client's connection is on (its id's tag)."""
    return int(c.auth_ok['conn'], 16) >> 58


async def on_worker(srv, kind, uid, worker, device):
    """A client of uid on the given worker: reconnect until the kernel's
    SO_REUSEPORT spreading puts one there."""
    for _ in range(64):
        c = await connect(srv, kind, uid, device=device)
        if worker_of(c) == worker:
            return c
        await c.close()
    raise AssertionError('no connection of %s landed on worker %d' % (uid, worker))


async def expect_msgs(c, want, what):
    """The next msgs on c: exactly the (field, value) pairs in want, in
    order (acks of c's own sends are skipped); returns their ids."""
    ids = []
    for i, w in enumerate(want):
        while True:
            m = await c.recv('%s %d of %d on %s' % (what, i + 1, len(want), c.uid))
            if m['op'] != 'ack':
                break
        check(m['op'] == 'msg', 'expected a msg, got %r' % m['_raw'][:200])
        for k, v in w.items():
            check(m.get(k) == v, '%s %d: %s is %r, expected %r' % (what, i, k, m.get(k), v))
        ids.append(m['id'])
    return ids


class TestTwoWorkers(ImdCase):
    server_args = ('--threads', '2', *NO_RATE_LIMITS)

    @scenario(timeout=120)
    async def test_one_server_on_two_threads(self):
        U = self.uid
        bob0 = await on_worker(self.srv, 'json', U('bob'), 0, 'phone')
        bob1 = await on_worker(self.srv, 'json', U('bob'), 1, 'laptop')
        alice = await on_worker(self.srv, 'json', U('alice'), 0, 'a')
        carol = await on_worker(self.srv, 'json', U('carol'), 1, 'c')
        bobs = (bob0, bob1)
        m = parse_metrics((await api(self.srv, 'GET', '/metrics')).body.decode())
        self.assertGreaterEqual(m['imd_worker_connections{worker="0"}'], 2, m)
        self.assertGreaterEqual(m['imd_worker_connections{worker="1"}'], 2, m)
        self.assertEqual(m['imd_users_online'], 3, m)   # bob counted once
        r = await api(self.srv, 'GET', '/v1/gateways')
        self.assertGreaterEqual(r.json['gateways'][0]['conns'], 4, r.json)   # both workers'

        # 1:1 from both workers to bob, whose devices are on both
        ids = []
        for sender, tag in ((alice, 'a'), (carol, 'c')):
            for i in range(N):
                await sender.send('msg', cid='%s%d' % (tag, i), to=U('bob'), data=i)
            want = [{'from': sender.uid, 'data': str(i)} for i in range(N)]
            got = [await expect_msgs(b, want, '1:1 from ' + tag) for b in bobs]
            self.assertEqual(got[0], got[1])               # the same messages
            ids += got[0]
        # group: alice writes to a group of bob and carol
        g = U('g')
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g,
                      {'add': [U('alice'), U('bob'), U('carol')]})
        self.assertEqual(r.status, 200, r)
        for i in range(N):
            await alice.send('msg', cid='g%d' % i, group=g, data=i)
        want = [{'group': g, 'data': str(i)} for i in range(N)]
        got = [await expect_msgs(c, want, 'group msg') for c in (bob0, bob1, carol)]
        self.assertTrue(got[0] == got[1] == got[2])
        ids += got[0]
        # room: members on both workers, carol (worker 1) writes
        for c in (bob0, bob1, alice, carol):
            await c.send('join', room=U('r'), cid='j')
            while True:   # the acks of c's own msgs may come first
                m = await c.expect('ack', 'the ack of the join')
                if m['cid'] == 'j':
                    break
        for i in range(N):
            await carol.send('msg', cid='r%d' % i, room=U('r'), data=i)
        want = [{'room': U('r'), 'data': str(i)} for i in range(N)]
        got = [await expect_msgs(c, want, 'room msg') for c in (bob0, bob1, alice)]
        self.assertTrue(got[0] == got[1] == got[2])
        ids += got[0]
        # HTTP pushes, each on a new connection (either worker's HTTP server)
        for i in range(N):
            r = await api(self.srv, 'POST', '/v1/messages', {'to': U('bob'), 'data': i})
            self.assertEqual((r.status, r.json['delivered']), (200, 2), r)
            ids.append(r.json['id'])
        want = [{'from': 'system', 'data': str(i)} for i in range(N)]
        for b in bobs:
            self.assertEqual(await expect_msgs(b, want, 'HTTP push'), ids[-N:])
        r = await api(self.srv, 'POST', '/v1/messages', {'room': U('r'), 'data': 99})
        self.assertEqual((r.status, r.json['delivered']), (200, 4), r)
        for c in (bob0, bob1, alice, carol):
            await expect_msgs(c, [{'data': '99'}], 'HTTP room push')
        ids.append(r.json['id'])
        # nothing more for anyone: exactly once
        for c in (bob0, bob1, alice, carol):
            await c.barrier()
        # ids: unique across workers; HTTP ids grow in the order answered
        self.assertEqual(len(set(ids)), len(ids))
        http_ids = [int(x) for x in ids[-N - 1:]]
        self.assertEqual(http_ids, sorted(http_ids))

        # presence from either worker lists both devices, distinct ids
        for _ in range(4):
            r = await api(self.srv, 'GET', '/v1/users/%s/presence' % U('bob'))
            conns = {c['conn']: c['device'] for c in r.json['connections']}
            self.assertEqual(conns, {bob0.auth_ok['conn']: 'phone',
                                     bob1.auth_ok['conn']: 'laptop'}, r.json)
        # kick closes both devices and counts them both
        r = await api(self.srv, 'POST', '/v1/users/%s/kick' % U('bob'))
        self.assertEqual((r.status, r.json['kicked']), (200, 2), r)
        for b in bobs:
            self.assertEqual(await b.closed(), 4403)
        await alice.barrier()
        await carol.barrier()
        r = await api(self.srv, 'GET', '/v1/users/%s/presence' % U('bob'))
        self.assertEqual(r.json['count'], 0, r.json)


class TestThreadsOptions(unittest.TestCase):
    def test_bad_values_refused(self):
        for args, why in ((('--threads', '0'), 'threads: 1 to'),
                          (('--threads', '65'), 'threads: 1 to'),
                          (('--threads', 'x'), 'threads'),
                          (('--threads', '2', '--redis', '127.0.0.1:1'), '--redis runs on one')):
            rc, out, err = run_cli('--secret', SECRET, '--ws', '127.0.0.1:0', '--tcp',
                                   '127.0.0.1:0', '--http', '127.0.0.1:0', '--data',
                                   '/nonexistent/imd-threads-test', *args)
            self.assertEqual(rc, 2, (args, out, err))
            self.assertIn(why, err, args)


if __name__ == '__main__':
    from imdclient import main
    main()
