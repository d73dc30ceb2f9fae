"""imd as a cluster: three nodes on one real redis-server (started here on a
free port, AOF with appendfsync always, in a temp dir), clients of one user
spread over nodes, and the faults of issue 8: a node killed, a node paused
past its lease, a node drained, Redis killed and restarted, a lost
cross-node notification.

Run: IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_cluster.py
"""
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (Client, Imd, api, assert_clean_exit, check, cli_token,  # noqa: E402
                       connect, parse_metrics, scenario, within, NO_RATE_LIMITS)
from test_delivery import Receiver, Sender, cids, figures  # noqa: E402
from test_abuse import Held, try_connect  # noqa: E402
from test_threads import expect_msgs, on_worker, worker_of  # noqa: E402

TTL = 2            # --lease-ttl of the nodes, seconds
RENEW = TTL / 3


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server of our own: AOF, fsync on every write."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='imd-redis-')
        self.port = free_port()
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ['redis-server', '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
             '--appendonly', 'yes', '--appendfsync', 'always', '--dir', self.dir,
             '--logfile', os.path.join(self.dir, 'redis.log')],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.cli('PING') == 'PONG':
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.02)
        raise RuntimeError('redis-server did not answer PING')

    def cli(self, *args):
        out = subprocess.run(['redis-cli', '-p', str(self.port), *args], capture_output=True,
                             timeout=10, check=True)
        return out.stdout.decode().strip()

    def session(self):
        """A connection of our own (RESP over a socket), for command
        sequences that must not open new connections."""
        return Resp(self.port)

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def addr(self):
        return '127.0.0.1:%d' % self.port


class Resp:
    def __init__(self, port):
        self.s = socket.create_connection(('127.0.0.1', port), timeout=10)
        self.f = self.s.makefile('rb')

    def pipeline(self, *cmds):
        out = b''
        for c in cmds:
            out += b'*%d\r\n' % len(c)
            for a in c:
                a = a.encode() if isinstance(a, str) else a
                out += b'$%d\r\n%s\r\n' % (len(a), a)
        self.s.sendall(out)
        return [self.read() for _ in cmds]

    def read(self):
        line = self.f.readline().rstrip(b'\r\n')
        kind, rest = line[:1], line[1:]
        if kind in (b'+', b'-'):
            return rest.decode()
        if kind == b':':
            return int(rest)
        if kind == b'$':
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data.decode(errors='replace')
        if kind == b'*':
            return [self.read() for _ in range(int(rest))]
        raise RuntimeError('bad RESP %r' % line)

    def close(self):
        self.f.close()
        self.s.close()


def node(redis, name, *extra):
    return Imd('--redis', redis.addr, '--node', name, '--lease-ttl', str(TTL),
               '--ack-timeout', '1000', *NO_RATE_LIMITS, *extra)


async def wait_for(pred, timeout, what):
    """Poll an async predicate every 50 ms; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        if await pred():
            return time.monotonic() - t0
        check(time.monotonic() - t0 < timeout, 'not within %.1f s: %s' % (timeout, what))
        await asyncio.sleep(0.05)


async def presence_nodes(srv, uid):
    r = await api(srv, 'GET', '/v1/users/%s/presence' % uid)
    check(r.status == 200, 'presence: %r' % r)
    return sorted(c.get('node', '(local)') for c in r.json['connections'])


async def all_up(nodes):
    for n in nodes:
        r = await api(n, 'GET', '/healthz', key=None)
        if r.status != 200:
            return False
    return True


class ClusterCase(unittest.TestCase):
    NODES = ('A', 'B', 'C')
    EXTRA = ()   # more imd options for every node

    def setUp(self):
        self.redis = Redis()
        self.addCleanup(self.redis.stop)
        self.nodes = {}
        for name in self.NODES:
            self.nodes[name] = node(self.redis, name, *self.EXTRA)
            self.addCleanup(self.stop_node, name)

    def stop_node(self, name, expect_clean=True):
        n = self.nodes.pop(name, None)
        if n is None:
            return
        rc, log = n.stop()
        n.remove_data()
        if expect_clean:
            assert_clean_exit(rc, log)

    async def ready(self):
        await wait_for(lambda: all_up(self.nodes.values()), 10, 'every node leased')

    async def _on(self, srv, uid, nodes):
        """uid's connections are on exactly these nodes (as srv sees it)."""
        return await presence_nodes(srv, uid) == nodes

    async def _listed(self, srv, nodes):
        r = await api(srv, 'GET', '/v1/gateways?uid=u')
        return sorted(g['node'] for g in r.json['gateways']) == nodes


class TestDelivery(ClusterCase):
    @scenario(90)
    async def test_every_kind_reaches_every_device_once(self):
        """alice on A, bob's phone on B, bob's pc on C: 1:1, group and room
        messages and HTTP pushes entered at any node reach every device
        exactly once, in order, with bob's seqs gap-free."""
        A, B, C = (self.nodes[k] for k in 'ABC')
        await self.ready()
        r = await api(B, 'PUT', '/v1/groups/team/members', {'add': ['alice', 'bob']})
        check(r.status == 200, 'group: %r' % r)
        alice = await connect(A, 'json', 'alice', device='laptop')
        phone, pc = Receiver(B, 'bob', 'phone', 'tcp'), Receiver(C, 'bob', 'pc', 'bin')
        await phone.connect(since=0)
        await pc.connect(since=0)
        for c in (alice, phone.c, pc.c):
            await c.send('join', room='lobby', cid='j')
            await c.expect('ack', cid='j')
        # presence from any node sees all three connections and their nodes
        await wait_for(lambda: self._on(A, 'bob', ['B', 'C']), 5, 'bob on B and C in presence')
        sent = []
        for i in range(20):
            ack = await alice.msg('d%d' % i, '{"n":%d}' % i, to='bob')
            sent.append(ack['id'])
        ack = await alice.msg('g1', '"to the team"', group='team')
        sent.append(ack['id'])
        for srv in (A, B, C):  # HTTP pushes entered at each node
            r = await api(srv, 'POST', '/v1/messages', {'to': 'bob', 'data': {'via': 'http'}})
            check(r.status == 200, 'push: %r' % r)
            sent.append(r.json['id'])
        await alice.send('msg', cid='r1', room='lobby', data='"hello room"')
        room_id = (await alice.expect('ack', cid='r1'))['id']
        for dev in (phone, pc):
            while len(dev.by_seq) < len(sent):
                m = await dev.c.recv('bob\'s messages')
                if m['op'] == 'msg' and 'seq' in m:
                    dev.take(m)
                    await dev.c.send('ack', id=m['id'], seq=m['seq'])
                else:
                    check(m['op'] == 'msg' and m.get('room') == 'lobby' and m['id'] == room_id,
                          'unexpected %r' % m['_raw'][:200])
                    dev.room = getattr(dev, 'room', 0) + 1
            got = [dev.by_seq[s][0] for s in sorted(dev.by_seq)]
            check(sorted(dev.by_seq) == list(range(1, len(sent) + 1)), 'seqs not gap-free')
            check(got == sent, '%s: order or ids differ' % dev.device)
            check(dev.copies == len(sent), '%s got %d copies of %d' % (dev.device, dev.copies,
                                                                      len(sent)))
            if getattr(dev, 'room', 0) == 0:
                await dev.c.expect('msg', room='lobby', id=room_id)
                dev.room = 1
            await dev.c.barrier('no second copy of anything')
            check(dev.room == 1, 'room message %d times on %s' % (dev.room, dev.device))
        # the sender's own inbox got the 1:1 and group copies (not the pushes)
        r = await api(C, 'GET', '/v1/users/alice/inbox')
        check(r.json['last'] == 21, 'alice inbox: %r' % r)
        # kick from A reaches bob's connections on B and C
        r = await api(A, 'POST', '/v1/users/bob/kick')
        check(r.status == 200, 'kick: %r' % r)
        check(await phone.c.closed() == 4403 and await pc.c.closed() == 4403, 'not kicked')
        figures('cluster_delivery', sent=len(sent), phone=phone.copies, pc=pc.copies)

    @scenario(60)
    async def test_longest_uid_across_nodes(self):
        """A uid of the full 128 bytes has its route found across nodes (the
        route key is the prefix, the tag and the whole uid)."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        long_uid = 'u' * 127 + 'z'
        rx = await connect(B, 'tcp', long_uid)
        await wait_for(lambda: self._on(A, long_uid, ['B']), 5, 'the long uid on B')
        tx = await connect(A, 'json', 'sender')
        ack = await tx.msg('l1', '"to the long one"', to=long_uid)
        m = await rx.expect('msg', id=ack['id'])
        check(m['data'] == '"to the long one"', 'data %r' % m)

    @scenario(60)
    async def test_gateways_least_loaded_first(self):
        A, B, C = (self.nodes[k] for k in 'ABC')
        await self.ready()
        r = await api(A, 'GET', '/v1/gateways?uid=u1', key=None)
        check(r.status == 401, 'gateways needs the API key: %r' % r)
        held = [await connect(B, 'json', 'x%d' % i) for i in range(2)]
        held.append(await connect(C, 'json', 'y', device='pad|1%2', platform='ios|x'))
        # presence on another node: every field as the client gave it
        await wait_for(lambda: self._on(A, 'y', ['C']), 5, 'y on C')
        r = await api(A, 'GET', '/v1/users/y/presence')
        c = r.json['connections'][0]
        check((c['node'], c['device'], c['platform'], c['transport']) ==
              ('C', 'pad|1%2', 'ios|x', 'ws'), 'presence: %r' % r)

        async def loads():
            r = await api(A, 'GET', '/v1/gateways?uid=u1')
            return [(g['node'], g['conns']) for g in r.json['gateways']]
        # the counts are renewed with the lease
        await wait_for(lambda: self._eq(loads, [('A', 0), ('C', 1), ('B', 2)]), 5, 'load order')
        r = await api(A, 'GET', '/v1/gateways?uid=u1')
        for g in r.json['gateways']:
            n = self.nodes[g['node']]
            check(g['ws'] == 'ws://127.0.0.1:%d/ws' % n.ws and g['tcp'] == '127.0.0.1:%d' % n.tcp,
                  'addresses: %r' % g)
        # ties are broken by the uid: not always the same node first
        for c in held:
            await c.close()
        await wait_for(lambda: self._all_zero(A), 5, 'loads back to 0')
        firsts = set()
        for i in range(24):
            r = await api(B, 'GET', '/v1/gateways?uid=user%d' % i)
            firsts.add(r.json['gateways'][0]['node'])
        check(len(firsts) >= 2, 'ties always go to %r' % firsts)

    async def _eq(self, fn, want):
        return await fn() == want

    async def _all_zero(self, srv):
        r = await api(srv, 'GET', '/v1/gateways?uid=u')
        return all(g['conns'] == 0 for g in r.json['gateways']) and len(r.json['gateways']) == 3


class TestDeliveryOneWorker(TestDelivery):
    """The same with nodes of one worker each (the module as the server's own
    router, no group)."""
    EXTRA = ('--threads', '1')


class TestWorkerThreadsOfANode(ClusterCase):
    """Nodes of two worker threads each act as one node: one lease, one
    delivery stream, one subscription per room, routes per connection."""
    NODES = ('A', 'B')
    EXTRA = ('--threads', '2')

    def numsub(self, channel):
        out = self.redis.cli('PUBSUB', 'NUMSUB', channel).split()
        return int(out[1])

    def routes(self, uid):
        out = self.redis.cli('HKEYS', 'im:route:{%s}' % uid).split()
        return sorted(f.split('/')[0] for f in out)

    @scenario(120)
    async def test_both_workers_are_the_node(self):
        """bob on both workers of A and on worker 1 of B, alice on B's
        worker 0 and carol on A's worker 1: 1:1 messages, HTTP pushes at
        either node and room messages reach each of bob's devices exactly
        once and in order, whichever worker sent or holds them; presence
        lists all three with A's two under A; A holds one subscription per
        room while any of its workers has a member, none after the last;
        a kick through B closes all three."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        check(self.redis.cli('SCARD', 'im:leases') == '2', 'one lease per node, not per worker')
        names = sorted(w[5:] for w in self.redis.cli('CLIENT', 'LIST').split() if
                       w.startswith('name=im:A:'))
        check(names == ['im:A:commands', 'im:A:commands:1', 'im:A:rooms', 'im:A:stream'],
              'A\'s Redis connections: %r' % names)
        m = parse_metrics((await api(A, 'GET', '/metrics')).body.decode())
        check(m['imd_cluster_links_up'] == 2, 'links up: %r' % m.get('imd_cluster_links_up'))
        a0 = await on_worker(A, 'json', 'bob', 0, 'a0')
        a1 = await on_worker(A, 'tcp', 'bob', 1, 'a1')
        b1 = await on_worker(B, 'json', 'bob', 1, 'b1')
        alice = await on_worker(B, 'json', 'alice', 0, 'laptop')
        carol = await on_worker(A, 'json', 'carol', 1, 'pad')
        bobs = (a0, a1, b1)
        await wait_for(lambda: self._on(B, 'bob', ['(local)', 'A', 'A']), 5, 'bob on A twice')
        check(self.routes('bob') == ['A', 'A', 'B'], 'routes: %r' % self.routes('bob'))
        r = await api(A, 'GET', '/v1/users/bob/presence')
        check(sorted(c.get('node', '(local)') for c in r.json['connections']) ==
              ['(local)', '(local)', 'B'], 'presence on A: %r' % r.json)

        # 1:1 from B's worker 0 and from A's worker 1 (the other worker of
        # a0, the same as a1)
        n = 10
        for sender, tag in ((alice, 'a'), (carol, 'c')):
            for i in range(n):
                await sender.send('msg', cid='%s%d' % (tag, i), to='bob', data=i)
            want = [{'from': sender.uid, 'data': str(i)} for i in range(n)]
            got = [await expect_msgs(b, want, '1:1 from ' + tag) for b in bobs]
            check(got[0] == got[1] == got[2], 'devices got different messages')
        # carol's 10 went through worker 1's store: A's /metrics counts them
        # whichever worker answers (each worker has a Redis store of its own)
        for _ in range(8):
            m = parse_metrics((await api(A, 'GET', '/metrics')).body.decode())
            check(m['imd_store_commits_total'] >= n, 'store commits on A: %r' %
                  m['imd_store_commits_total'])
        # HTTP pushes entered at A (either worker) and at B
        for srv in (A, B, A, B):
            r = await api(srv, 'POST', '/v1/messages', {'to': 'bob', 'data': 'h'})
            check(r.status == 200, 'push: %r' % r)
        for b in bobs:
            await expect_msgs(b, [{'from': 'system', 'data': '"h"'}] * 4, 'HTTP pushes')

        # a room with members on both workers of A and on B: one
        # subscription for A, however many of its workers have members
        for c in bobs + (alice, carol):
            await c.send('join', room='lobby', cid='j')
            while (await c.expect('ack', 'the join'))['cid'] != 'j':
                pass
        await wait_for(self._subs(2), 5, 'A and B subscribed to the room once each')
        await alice.send('msg', cid='r1', room='lobby', data='"from B"')
        await carol.send('msg', cid='r2', room='lobby', data='"from A"')
        for i, c in enumerate(bobs):
            got = sorted(m['data'] for m in [await c.expect('msg'), await c.expect('msg')])
            check(got == ['"from A"', '"from B"'], 'room on bob\'s %d: %r' % (i, got))
        for c, data in ((alice, '"from A"'), (carol, '"from B"')):
            await expect_msgs(c, [{'data': data}], 'the other\'s room message')
        # an HTTP room push at A: A's three members counted, B's reached too
        r = await api(A, 'POST', '/v1/messages', {'room': 'lobby', 'data': 'hr'})
        check(r.status == 200 and r.json['delivered'] == 3, 'room push: %r' % r)
        for c in bobs + (alice, carol):
            await expect_msgs(c, [{'data': '"hr"'}], 'the HTTP room push')
        for c in bobs + (alice, carol):
            await c.barrier('nothing twice')
        # A's worker 1 leaves (a1 and carol): A keeps its subscription for a0
        for c in (a1, carol):
            await c.send('leave', room='lobby', cid='l')
            while (await c.expect('ack', 'the leave'))['cid'] != 'l':
                pass
        await asyncio.sleep(0.3)
        check(self.numsub('im:room:{lobby}') == 2, 'A unsubscribed while a0 is a member')
        await alice.send('msg', cid='r3', room='lobby', data='"still"')
        check((await a0.expect('msg'))['data'] == '"still"', 'a0 lost the room')
        await a0.send('leave', room='lobby', cid='l')
        while (await a0.expect('ack', 'the leave'))['cid'] != 'l':
            pass
        await wait_for(self._subs(1), 5, 'A unsubscribed after its last member left')

        # a kick through B closes bob everywhere
        r = await api(B, 'POST', '/v1/users/bob/kick')
        check(r.status == 200, 'kick: %r' % r)
        for i, b in enumerate(bobs):
            check(await b.closed() == 4403, 'bob\'s %d not kicked' % i)
        await wait_for(lambda: self._on(A, 'bob', []), 5, 'bob gone from presence')
        check(self.routes('bob') == [], 'routes left: %r' % self.routes('bob'))
        check(self.redis.cli('SISMEMBER', 'im:noderoutes:A|%s' %
                             self.redis.cli('HGET', 'im:node:A', 'epoch'), 'bob') == '0',
              'bob left in A\'s route index')

    def _subs(self, n):
        async def pred():
            return self.numsub('im:room:{lobby}') == n
        return pred

    @scenario(90)
    async def test_zombie_rewrites_every_workers_routes(self):
        """SIGSTOP A past its TTL (B purges its routes), SIGCONT: A takes a
        new epoch and both of its workers write their connections' routes
        again; messages from B reach both."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        a0 = await on_worker(A, 'json', 'bob', 0, 'a0')
        a1 = await on_worker(A, 'json', 'bob', 1, 'a1')
        await wait_for(lambda: self._on(B, 'bob', ['A', 'A']), 5, 'bob on A twice')
        A.proc.send_signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: self._on(B, 'bob', []), TTL + RENEW + 3, 'zombie purged')
        finally:
            A.proc.send_signal(signal.SIGCONT)
        await wait_for(lambda: self._on(B, 'bob', ['A', 'A']), TTL + 1, 'both routes rewritten')
        epoch = self.redis.cli('HGET', 'im:node:A', 'epoch')
        values = self.redis.cli('HVALS', 'im:route:{bob}').split()
        check(len(values) == 2 and all(v.startswith('A|%s|' % epoch) for v in values),
              'routes %r not of the new epoch %s' % (values, epoch))
        alice = await connect(B, 'json', 'alice')
        ack = await alice.msg('z1', '"welcome back"', to='bob')
        for c in (a0, a1):
            m = await c.expect('msg', id=ack['id'])
            check(m['data'] == '"welcome back"', 'data %r' % m['data'])
        check({worker_of(a0), worker_of(a1)} == {0, 1}, 'not on both workers')


class TestNodeFaults(ClusterCase):
    @scenario(90)
    async def test_kill_9_node(self):
        """kill -9 B: its routes leave presence within TTL + one renew
        interval; bob's phone gets a gateway without B, reconnects there with
        since, and has every message."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        alice = await connect(A, 'json', 'alice')
        phone = Receiver(B, 'bob', 'phone')
        await phone.connect(since=0)
        await wait_for(lambda: self._on(A, 'bob', ['B']), 5, 'bob on B')
        snd = Sender(alice, 'bob')
        await snd.burst(cids(50))
        B.proc.kill()
        B.proc.wait()
        t0 = time.monotonic()
        await snd.burst(cids(50, 50))  # while B is dead: stored for bob
        took = await wait_for(lambda: self._on(A, 'bob', []), TTL + RENEW + 3,
                              'bob\'s route on dead B purged')
        took = time.monotonic() - t0
        check(took <= TTL + 2 * RENEW + 1, 'purged after %.2f s' % took)
        r = await api(A, 'GET', '/v1/gateways?uid=bob')
        nodes = [g['node'] for g in r.json['gateways']]
        check('B' not in nodes and len(nodes) == 2, 'gateways: %r' % nodes)
        target = self.nodes[nodes[0]]
        phone.srv = target
        await phone.connect()
        check(sorted(phone.by_seq) == list(range(1, 101)), 'bob has %d of 100' % len(phone.by_seq))
        ids = {v[0] for v in phone.by_seq.values()}
        check(ids == {a[0] for a in snd.acks.values()}, 'ids differ from the acked ones')
        self.nodes.pop('B').remove_data()
        figures('cluster_kill9', purge_s='%.2f' % took, delivered=len(phone.by_seq))

    @scenario(90)
    async def test_zombie_node_comes_back(self):
        """SIGSTOP C past its TTL (the others purge its routes), SIGCONT: it
        notices the lost lease, takes a new epoch and its connections
        reappear in presence within one TTL; the survivors' purge of the
        old epoch never deletes the new routes."""
        A, C = self.nodes['A'], self.nodes['C']
        await self.ready()
        pc = await connect(C, 'json', 'bob', device='pc')
        await wait_for(lambda: self._on(A, 'bob', ['C']), 5, 'bob on C')
        epoch0 = int(self.redis.cli('HGET', 'im:node:C', 'epoch'))
        C.proc.send_signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: self._on(A, 'bob', []), TTL + RENEW + 3, 'zombie purged')
        finally:
            C.proc.send_signal(signal.SIGCONT)
        t0 = time.monotonic()
        await wait_for(lambda: self._on(A, 'bob', ['C']), TTL + 1, 'routes rewritten')
        back = time.monotonic() - t0
        epoch1 = int(self.redis.cli('HGET', 'im:node:C', 'epoch'))
        check(epoch1 > epoch0, 'no new epoch: %d -> %d' % (epoch0, epoch1))
        # several purge rounds later the new routes are still there
        await asyncio.sleep(3 * RENEW)
        check(await presence_nodes(A, 'bob') == ['C'], 'new routes purged')
        # and the zombie's connection works across nodes again
        alice = await connect(A, 'json', 'alice')
        ack = await alice.msg('z1', '"welcome back"', to='bob')
        m = await pc.expect('msg', id=ack['id'])
        check(m['data'] == '"welcome back"', 'data %r' % m['data'])
        figures('cluster_zombie', epoch_before=epoch0, epoch_after=epoch1, back_s='%.2f' % back)


class TestDrain(ClusterCase):
    @scenario(120)
    async def test_drain_while_sending(self):
        """Drain C while alice sends 500 messages to bob: bob's pc gets
        goaway, reconnects to A or B and syncs; bob has all 500, gap-free,
        no duplicate ids; C exits 0."""
        A, C = self.nodes['A'], self.nodes['C']
        await self.ready()
        alice = await connect(A, 'json', 'alice')
        pc = Receiver(C, 'bob', 'pc')
        await pc.connect(since=0)
        await wait_for(lambda: self._on(A, 'bob', ['C']), 5, 'bob on C')
        snd = Sender(alice, 'bob')
        sending = asyncio.ensure_future(snd.burst(cids(500), window=16))
        goaway = None
        got_live = 0
        while len(pc.by_seq) < 100:
            m = await pc.c.recv('msgs before the drain')
            pc.take(m)
            await pc.c.send('ack', id=m['id'], seq=m['seq'])
        r = await api(C, 'POST', '/v1/admin/drain')
        check(r.status == 202 and r.json['draining'], 'drain: %r' % r)
        # gone from the lists within a Redis round trip
        await wait_for(lambda: self._listed(A, ['A', 'B']), 1, 'C out of the gateway list')
        r = await api(A, 'GET', '/v1/gateways?uid=bob')
        while goaway is None:
            m = await pc.c.recv('goaway')
            if m['op'] == 'goaway':
                goaway = m
            else:
                pc.take(m)
                await pc.c.send('ack', id=m['id'], seq=m['seq'])
                got_live += 1
        check(0 <= goaway['reconnect_ms'] < 2000, 'goaway %r' % goaway['_raw'])
        await pc.c.close()
        target = self.nodes[r.json['gateways'][0]['node']]
        pc.srv = target
        await pc.connect()
        await within(sending, 60, 'the 500 acks')
        while pc.contiguous() < 500:
            m = await pc.c.recv('the rest')
            pc.take(m)
            await pc.c.send('ack', id=m['id'], seq=m['seq'])
        check(sorted(pc.by_seq) == list(range(1, 501)), 'gap: %d' % len(pc.by_seq))
        ids = [v[0] for v in pc.by_seq.values()]
        check(len(set(ids)) == 500, 'duplicate ids')
        rc = C.proc.wait(30)
        check(rc == 0, 'drained node exit status %r' % rc)
        _, log = C.stop()
        self.nodes.pop('C').remove_data()
        check('drained' in log, 'log: %s' % log)
        figures('cluster_drain', sent=500, delivered=len(pc.by_seq), copies=pc.copies)


class TestRedisFaults(ClusterCase):
    NODES = ('A', 'B')

    @scenario(120)
    async def test_redis_killed_and_restarted(self):
        """kill -9 redis-server mid-run and restart it on the same port and
        dir: sends during the outage get 503, never an ack; every message
        acked before the kill is still there; traffic resumes."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        alice = await connect(A, 'tcp', 'alice')
        bob = Receiver(B, 'bob', 'phone')
        await bob.connect(since=0)
        snd = Sender(alice, 'bob')
        await snd.burst(cids(100))
        self.redis.kill9()
        r = await api(A, 'GET', '/healthz', key=None)
        await wait_for(lambda: self._health(A, 503), 5, 'healthz 503')
        r = await api(A, 'GET', '/healthz', key=None)
        check(r.json.get('redis') == 'down', 'healthz: %r' % r)
        m = parse_metrics((await api(A, 'GET', '/metrics')).body.decode())
        check(m['imd_cluster_links_up'] == 0, 'links up: %r' % m.get('imd_cluster_links_up'))
        refused = 0
        for i in range(5):
            await alice.send('msg', cid='out%d' % i, to='bob', data='1')
            m = await alice.recv('the answer during the outage')
            check(m['op'] == 'error' and m['code'] == 503 and m.get('cid') == 'out%d' % i,
                  'during the outage: %r' % m['_raw'][:200])
            refused += 1
        r = await api(A, 'POST', '/v1/messages', {'to': 'bob', 'data': 1})
        check(r.status == 503 and r.json['error'] == 'store unavailable', 'push: %r' % r)
        await alice.send('sync', since=0)   # a sync too: 503, the store is away
        m = await alice.recv('the sync answer during the outage')
        check(m['op'] == 'error' and m['code'] == 503 and m['reason'] == 'store unavailable',
              'sync during the outage: %r' % m['_raw'][:200])
        self.redis.start()
        t0 = time.monotonic()
        await wait_for(lambda: all_up([A, B]), 15, 'nodes back')
        ack = None
        while ack is None:  # a retry until the store answers
            await alice.send('msg', cid='after', to='bob', data='"after"')
            m = await alice.recv('the answer after the restart')
            if m['op'] == 'msg':
                continue  # her own copies, pushed again by the repair (she never ACKs them)
            if m['op'] == 'ack':
                ack = m
            else:
                check(m['op'] == 'error' and m['code'] == 503, 'after: %r' % m['_raw'][:200])
                await asyncio.sleep(0.1)
        resumed = time.monotonic() - t0
        check(resumed < 10, 'traffic resumed after %.1f s' % resumed)
        # everything acked before the kill is still there, and the new one
        bob2 = Receiver(A, 'bob', 'tablet')
        await bob2.connect(since=0)
        check(sorted(bob2.by_seq) == list(range(1, 102)), 'inbox %d' % len(bob2.by_seq))
        check({v[0] for v in bob2.by_seq.values()} ==
              {a[0] for a in snd.acks.values()} | {ack['id']}, 'ids differ')
        figures('cluster_redis_kill', acked_before=100, refused=refused,
                resumed_s='%.2f' % resumed, kept=len(bob2.by_seq))

    async def _health(self, srv, status):
        r = await api(srv, 'GET', '/healthz', key=None)
        return r.status == status

    @scenario(90)
    async def test_lost_notification_is_repaired(self):
        """The last message of a burst whose cross-node notification is lost
        (the delivery stream entry is gone while bob's node is cut off from
        Redis) still reaches bob without a reconnect of bob: the node syncs
        its connections from their delivered marks when its stream link
        comes back."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        alice = await connect(A, 'json', 'alice')
        bob = Receiver(B, 'bob', 'phone')
        await bob.connect(since=0)
        await wait_for(lambda: self._on(A, 'bob', ['B']), 5, 'bob on B')
        for i in range(5):
            ack = await alice.msg('a%d' % i, '%d' % i, to='bob')
            m = await bob.c.expect('msg', id=ack['id'])
            bob.take(m)
            await bob.c.send('ack', id=m['id'], seq=m['seq'])
        # cut B's delivery-stream link and keep it out (no free client slot),
        # so that the notification of the last message can be lost on purpose
        r = self.redis.session()
        self.addCleanup(r.close)
        clients = r.pipeline(['CLIENT', 'LIST'])[0].splitlines()
        stream = [c for c in clients if 'name=im:B:stream ' in c + ' ']
        check(len(stream) == 1, 'B\'s stream link: %r' % clients)
        cid = stream[0].split('id=')[1].split()[0]
        kill, cfg = r.pipeline(['CLIENT', 'KILL', 'ID', cid],
                               ['CONFIG', 'SET', 'maxclients', str(len(clients) - 1)])
        check(kill == 1 and cfg == 'OK', 'kill %r, config %r' % (kill, cfg))
        last = await alice.msg('last', '"the last of the burst"', to='bob')
        gone = r.pipeline(['XLEN', 'im:deliver:{B}'], ['DEL', 'im:deliver:{B}'])
        check(gone[0] >= 1 and gone[1] == 1, 'the notification was not there: %r' % gone)
        check(r.pipeline(['CONFIG', 'SET', 'maxclients', '10000'])[0] == 'OK', 'maxclients')
        m = await bob.c.expect('msg', id=last['id'])
        check(m['seq'] == 6, 'seq %r' % m.get('seq'))
        figures('cluster_repair', repaired=1)


class TestRevocation(ClusterCase):
    NODES = ('A', 'B')

    @scenario(60)
    async def test_revoke_on_one_node_holds_on_all(self):
        """POST /v1/users/alice/revoke on A: alice's connection on B closes
        with 4411, B refuses her old token within about a second, a new
        token works on B, and A restarted still refuses the old one."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        old = cli_token('alice', 'pc')
        pc = await connect(B, 'json', 'alice', 'pc', token=old)
        r = await api(A, 'POST', '/v1/users/alice/revoke')
        check(r.status == 200, 'revoke: %r' % r)
        check(await pc.closed() == 4411, 'close code on B')

        async def refused_on_b():
            c = await Client.open(B.ws, 'json')
            m = await c.auth('alice', old, 'pc')
            await c.close()
            return m['op'] == 'error' and m['reason'] == 'token revoked'
        took = await wait_for(refused_on_b, 5, 'B refusing the revoked token')
        check(took < 3, 'B took %.1f s' % took)
        await connect(B, 'tcp', 'alice', 'pc', token=cli_token('alice', 'pc'))
        # a node started afresh (empty data dir) learns it from Redis
        rc, log = A.stop()
        A.remove_data()
        assert_clean_exit(rc, log)
        self.nodes['A'] = A = node(self.redis, 'A')
        await self.ready()

        async def refused_on_a():
            c = await Client.open(A.tcp, 'tcp')
            m = await c.auth('alice', old, 'pc')
            await c.close()
            return m['op'] == 'error' and m['reason'] == 'token revoked'
        await wait_for(refused_on_a, 5, 'the restarted A refusing the revoked token')


async def admitted(srv, uid, kind='json'):
    """Whether uid can log in on srv now (closed again at once)."""
    c = await Client.open(srv.tcp if kind == 'tcp' else srv.ws, kind)
    m = await c.auth(uid, cli_token(uid, 'd1'), 'd1')
    await c.close()
    if m['op'] == 'error':
        check(m['reason'] == 'banned', 'refused for another reason: %r' % m)
    return m['op'] == 'auth_ok'


async def listed(srv):
    r = await api(srv, 'GET', '/v1/bans')
    check(r.status == 200, 'bans: %r' % r)
    return r.json['bans']


class TestClusterBans(ClusterCase):
    NODES = ('A', 'B')

    async def until(self, what, timeout, pred):
        took = await wait_for(pred, timeout, what)
        check(took < 3, '%s took %.1f s' % (what, took))

    @scenario(90)
    async def test_ban_on_one_node_holds_on_all(self):
        """A ban made through A's API refuses the uid and the address on B
        and closes their live sessions there (4403); GET on B lists it at
        once; a lift through B admits them on A again; a TTL ends the ban
        on both; a node started afresh loads the bans from Redis."""
        A, B = self.nodes['A'], self.nodes['B']
        await self.ready()
        alice = await connect(B, 'json', 'alice')
        held = await Held.open(B.tcp, '127.0.0.9')
        r = await api(A, 'POST', '/v1/bans', {'uid': 'alice', 'ttl': 0})
        check(r.status == 200 and r.json['banned'], 'uid ban: %r' % r)
        r = await api(A, 'POST', '/v1/bans', {'ip': '127.0.0.9/30', 'ttl': 60})
        check(r.status == 200 and r.json['banned'], 'ip ban: %r' % r)
        got = await listed(B)   # read from Redis, not what B merged so far
        check(any(x.get('uid') == 'alice' and x['until'] == 0 for x in got), 'B lists %r' % got)
        check(any(x.get('ip') == '127.0.0.8/30' and x['until'] > 0 and not x['automatic']
                  for x in got), 'B lists %r' % got)
        check(await alice.closed() == 4403, 'alice on B not closed with 4403')
        await held.closed()

        async def refused_on_b():
            return not await admitted(B, 'alice', 'tcp') and \
                not await try_connect(B.tcp, '127.0.0.10')
        await self.until('B refusing alice and 127.0.0.10', 5, refused_on_b)
        check(await try_connect(B.tcp, '127.0.0.12'), '127.0.0.12 is outside the /30')

        # lifted through B: A admits again
        for body in ({'uid': 'alice'}, {'ip': '127.0.0.10/30'}):
            r = await api(B, 'DELETE', '/v1/bans', body)
            check(r.status == 200 and not r.json['banned'], 'unban %r: %r' % (body, r))
        r = await api(B, 'DELETE', '/v1/bans', {'uid': 'nobody'})
        check(r.status == 404, 'unknown ban: %r' % r)

        async def admitted_on_a():
            return await admitted(A, 'alice') and await try_connect(A.tcp, '127.0.0.10')
        await self.until('A admitting alice and 127.0.0.10 again', 5, admitted_on_a)
        check(not [x for x in await listed(A) if not x.get('automatic')], 'A still lists bans')

        # a TTL ends the ban on every node, and the Redis key with it
        for body in ({'uid': 'carol', 'ttl': 2}, {'ip': '127.0.0.20', 'ttl': 2}):
            r = await api(A, 'POST', '/v1/bans', body)
            check(r.status == 200, 'ban %r: %r' % (body, r))

        async def refused_on_both():
            for n in (A, B):
                if await admitted(n, 'carol') or await try_connect(n.tcp, '127.0.0.20'):
                    return False
            return True
        await self.until('carol and 127.0.0.20 refused on A and B', 5, refused_on_both)

        async def expired_on_both():
            for n in (A, B):
                if not await admitted(n, 'carol') or not await try_connect(n.tcp, '127.0.0.20'):
                    return False
            return True
        await wait_for(expired_on_both, 6, 'the 2 s bans over on A and B')

        async def hash_gone():
            return self.redis.cli('EXISTS', 'im:{bans}') == '0'
        await wait_for(hash_gone, 3, 'the Redis hash expired with its last ban')

        # a node that starts afresh loads the cluster's bans
        r = await api(A, 'POST', '/v1/bans', {'uid': 'dave'})
        check(r.status == 200, 'ban dave: %r' % r)
        self.stop_node('B')
        self.nodes['B'] = B = node(self.redis, 'B')
        await self.ready()

        async def dave_refused():
            return not await admitted(B, 'dave')
        await self.until('the restarted B refusing dave', 5, dave_refused)


if __name__ == '__main__':
    if not shutil.which('redis-server'):
        print('redis-server not found: cluster tests skipped')
        sys.exit(0)
    unittest.main(verbosity=2)
