"""The ownership rules of the cluster module's Lua scripts
(lib/redis/redis_scripts.h, read from the header so the very text libim
runs is tested) against a real redis-server: a stale epoch can neither
overwrite nor delete a newer route, a purge removes exactly the lapsed
epoch's routes, a live name cannot be leased twice, node ids are unique.

Run: /usr/bin/python3 tests/integration/test_redis_scripts.py
"""
import os
import re
import shutil
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cluster import Redis  # noqa: E402

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'lib', 'redis',
                      'redis_scripts.h')


def load_scripts():
    text = open(HEADER).read()
    scripts = {}
    for m in re.finditer(r'#define (LUA_\w+)\s*\\\n(.*?)\n\n', text + '\n\n', re.S):
        src = ''
        for line in m.group(2).split('\n'):
            ref = re.fullmatch(r'\s*(LUA_\w+)\s*\\?\s*', line)
            if ref:  # another script's macro pasted in
                src += scripts[ref.group(1)]
                continue
            parts = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
            src += bytes(''.join(parts), 'utf-8').decode('unicode_escape')
        scripts[m.group(1)] = src
    return scripts


S = load_scripts()


class ScriptCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.redis = Redis()
        cls.r = cls.redis.session()

    @classmethod
    def tearDownClass(cls):
        cls.r.close()
        cls.redis.stop()

    def setUp(self):
        self.r.pipeline(['FLUSHALL'])

    def eval(self, name, keys, args):
        return self.r.pipeline(['EVAL', S[name], str(len(keys)), *keys, *map(str, args)])[0]

    def route(self, node, epoch, extra='web|phone|1.2.3.4:5|1000|ws'):
        return '%s|%d|%s' % (node, epoch, extra)

    def hget(self, key, field):
        return self.r.pipeline(['HGET', key, field])[0]


class TestRoutes(ScriptCase):
    K, IDX = 'im:route:{bob}', 'im:noderoutes:A|2'

    def test_put_refuses_an_older_epoch(self):
        self.assertEqual(self.eval('LUA_ROUTE_PUT', [self.K, self.IDX],
                                   ['A/1', self.route('A', 5), 5, 'bob']), 1)
        # the zombie (epoch 4) cannot overwrite what epoch 5 wrote
        self.assertEqual(self.eval('LUA_ROUTE_PUT', [self.K, self.IDX],
                                   ['A/1', self.route('A', 4, 'x|y|z|0|tcp'), 4, 'bob']), 0)
        self.assertEqual(self.hget(self.K, 'A/1'), self.route('A', 5))
        # the same or a newer epoch may
        self.assertEqual(self.eval('LUA_ROUTE_PUT', [self.K, self.IDX],
                                   ['A/1', self.route('A', 6), 6, 'bob']), 1)
        self.assertEqual(self.r.pipeline(['SISMEMBER', self.IDX, 'bob'])[0], 1)

    def test_delete_only_its_own_epoch(self):
        self.eval('LUA_ROUTE_PUT', [self.K, self.IDX], ['A/1', self.route('A', 5), 5, 'bob'])
        self.assertEqual(self.eval('LUA_ROUTE_DEL', [self.K, self.IDX],
                                   ['A/1', 4, 'bob', 'A|4']), 0)
        self.assertEqual(self.hget(self.K, 'A/1'), self.route('A', 5))
        self.assertEqual(self.eval('LUA_ROUTE_DEL', [self.K, self.IDX],
                                   ['A/1', 5, 'bob', 'A|5']), 1)
        self.assertIsNone(self.hget(self.K, 'A/1'))
        self.assertEqual(self.r.pipeline(['SISMEMBER', self.IDX, 'bob'])[0], 0)
        self.assertEqual(self.eval('LUA_ROUTE_DEL', [self.K, self.IDX],
                                   ['A/1', 5, 'bob', 'A|5']), 0)

    def test_index_kept_while_a_route_of_the_node_is_left(self):
        """Two threads of node A close bob's two connections at once (each
        would see the other's still open): the uid stays in A's route index
        while a route of A (this epoch) is left in the hash, and leaves it
        with the last, whatever another node holds."""
        for field, node in (('A/1', 'A'), ('A/2', 'A'), ('B/7', 'B')):
            self.eval('LUA_ROUTE_PUT', [self.K, self.IDX], [field, self.route(node, 5), 5, 'bob'])
        self.assertEqual(self.eval('LUA_ROUTE_DEL', [self.K, self.IDX],
                                   ['A/1', 5, 'bob', 'A|5']), 1)
        self.assertEqual(self.r.pipeline(['SISMEMBER', self.IDX, 'bob'])[0], 1)
        # B's route is no reason to keep A's index entry
        self.assertEqual(self.eval('LUA_ROUTE_DEL', [self.K, self.IDX],
                                   ['A/2', 5, 'bob', 'A|5']), 1)
        self.assertEqual(self.r.pipeline(['SISMEMBER', self.IDX, 'bob'])[0], 0)
        self.assertEqual(self.hget(self.K, 'B/7'), self.route('B', 5))

    def test_route_push_one_entry_per_node(self):
        """The sends of a pass reach each other node holding their uids in
        one stream entry: each send's record with that node's uids only,
        in send order; nothing for this node or for uids without routes."""
        self.r.pipeline(['HSET', 'im:route:{u1}', 'A/1', self.route('A', 1), 'B/1',
                         self.route('B', 1), 'B/2', self.route('B', 1), 'C/1',
                         self.route('C', 1)],
                        ['HSET', 'im:route:{u2}', 'A/9', self.route('A', 1), 'C/4',
                         self.route('C', 1)])
        keys = ['im:route:{u1}', 'im:route:{u2}', 'im:route:{u3}']
        # send 1: head H1 to u1 and u2; send 2: head H2 to u3 and u1
        args = ['A', 'im:', 1000, 2, 'H1', 2, 1, 2, 'u1', 'u2', 'H2', 2, 3, 1, 'u3', 'u1']
        self.assertEqual(self.eval('LUA_ROUTE_PUSH', keys, args), 2)

        def uids(*names):
            out = struct.pack('<I', len(names))
            for n in names:
                out += struct.pack('<I', len(n) + 1) + n.encode() + b'\0'
            return out
        for node, want in (('B', b'H1' + uids('u1') + b'H2' + uids('u1')),
                           ('C', b'H1' + uids('u1', 'u2') + b'H2' + uids('u1'))):
            entries = self.r.pipeline(['XRANGE', 'im:deliver:{%s}' % node, '-', '+'])[0]
            self.assertEqual(len(entries), 1, node)
            self.assertEqual(entries[0][1][1].encode('latin-1'), want, node)
        self.assertEqual(self.r.pipeline(['EXISTS', 'im:deliver:{A}'])[0], 0)


    def test_push_patches_each_receivers_seq(self):
        """im_push (the functions an application's store script gets from
        im_redis_push_lua()): each other node holding a receiver gets one
        entry with a record per receiver it holds, carrying that
        receiver's seq (one over 2^32; every byte of it below 0x80, as
        the session decodes bulk strings as UTF-8); this node and
        receivers without routes get nothing."""
        self.r.pipeline(['HSET', 'im:route:{bob}', 'A/1', self.route('A', 1), 'B/1',
                         self.route('B', 1), 'C/2', self.route('C', 1)],
                        ['HSET', 'im:route:{al}', 'A/2', self.route('A', 1), 'C/1',
                         self.route('C', 1)])
        def s(v):
            return struct.pack('<I', len(v) + 1) + v + b'\0' if v else struct.pack('<I', 0)
        data = b'{"x":1}'
        head = (b'M' + struct.pack('<IQQ', 1, 0, 4328719365) + s(b'42') + s(b'al') +
                s(b'bob') + s(None) + s(None) + struct.pack('<I', len(data)) + data + b'\0')
        script = S['LUA_PUSH_FNS'] + (
            'return im_push(ARGV[1], ARGV[2], ARGV[3], ARGV[4], {ARGV[5], ARGV[6], ARGV[7]},'
            ' {tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])})')
        n = self.r.pipeline(['EVAL', script, '0', 'A', 'im:', '1000', head, 'bob', 'al',
                             'nobody', '7', '1099511627783', '1'])[0]
        self.assertEqual(n, 2)

        def rec(seq, uid):
            return (head[:5] + struct.pack('<Q', seq) + head[13:] + struct.pack('<I', 1) +
                    s(uid))
        for node, want in (('B', rec(7, b'bob')),
                           ('C', rec(7, b'bob') + rec(1099511627783, b'al'))):
            entries = self.r.pipeline(['XRANGE', 'im:deliver:{%s}' % node, '-', '+'])[0]
            self.assertEqual(len(entries), 1, node)
            self.assertEqual(entries[0][1][1].encode('latin-1'), want, node)
        self.assertEqual(self.r.pipeline(['EXISTS', 'im:deliver:{A}'])[0], 0)


class TestLeases(ScriptCase):
    def acquire(self, name, epoch, ttl=5000, slot=7):
        return self.eval('LUA_LEASE_ACQUIRE', ['im:node:' + name, 'im:nodeids', 'im:leases'],
                         [name, epoch, ttl, 'ws://x', 'x:1', 0, 0, slot])

    def test_live_name_cannot_be_leased_twice(self):
        self.assertEqual(self.acquire('A', 1), 7)
        self.assertEqual(self.acquire('A', 2), -1)       # A lives under epoch 1
        self.assertEqual(self.acquire('A', 1), 7)        # the holder itself may
        self.assertEqual(self.acquire('B', 3), 8)        # slot 7 is taken: next one
        self.assertEqual(self.hget('im:node:A', 'node_id'), '7')

    def test_renew_fails_after_the_lease_changed_hands(self):
        self.acquire('A', 1)
        keys = ['im:node:A', 'im:nodeids']
        self.assertEqual(self.eval('LUA_LEASE_RENEW', keys, ['A', 1, 5000, 3, 0, 7]), 1)
        self.r.pipeline(['DEL', 'im:node:A'])            # the lease lapsed
        self.assertEqual(self.eval('LUA_LEASE_RENEW', keys, ['A', 1, 5000, 3, 0, 7]), 0)
        self.assertEqual(self.acquire('A', 2), 7)        # re-leased, same node id back
        self.assertEqual(self.eval('LUA_LEASE_RENEW', keys, ['A', 1, 5000, 3, 0, 7]), 0)

    def test_node_ids_unique_until_expired(self):
        ids = {self.acquire('n%d' % i, 10 + i, slot=3) for i in range(20)}
        self.assertEqual(len(ids), 20)
        self.assertEqual(self.acquire('late', 99, ttl=5000, slot=3), 23)

    def test_purge_removes_exactly_the_lapsed_epoch(self):
        # A leased under epoch 1 wrote routes, then lapsed; A came back as epoch 3
        self.acquire('A', 1)
        for field, ep in (('A/1', 1), ('A/2', 1)):
            self.eval('LUA_ROUTE_PUT', ['im:route:{bob}', 'im:noderoutes:A|1'],
                      [field, self.route('A', ep), ep, 'bob'])
        self.r.pipeline(['DEL', 'im:node:A'])
        self.acquire('A', 3)
        self.eval('LUA_ROUTE_PUT', ['im:route:{bob}', 'im:noderoutes:A|3'],
                  ['A/2', self.route('A', 3), 3, 'bob'])      # rewritten under the new epoch
        self.eval('LUA_ROUTE_PUT', ['im:route:{bob}', 'im:noderoutes:A|3'],
                  ['A/5', self.route('A', 3), 3, 'bob'])
        self.acquire('B', 2, slot=100)
        dead = self.eval('LUA_PURGE', ['im:leases'], ['im:', 'B|2'])
        self.assertEqual(dead, ['A|1'])
        left = self.r.pipeline(['HGETALL', 'im:route:{bob}'])[0]
        self.assertEqual(dict(zip(left[::2], left[1::2])),
                         {'A/2': self.route('A', 3), 'A/5': self.route('A', 3)})
        self.assertEqual(self.r.pipeline(['EXISTS', 'im:noderoutes:A|1'])[0], 0)
        self.assertEqual(sorted(self.r.pipeline(['SMEMBERS', 'im:leases'])[0]), ['A|3', 'B|2'])
        # a node gone for good: its delivery stream goes too
        self.r.pipeline(['XADD', 'im:deliver:{B}', '*', 'b', 'x'], ['DEL', 'im:node:B'])
        self.assertEqual(self.eval('LUA_PURGE', ['im:leases'], ['im:', 'A|3']), ['B|2'])
        self.assertEqual(self.r.pipeline(['EXISTS', 'im:deliver:{B}'])[0], 0)

    def test_release_only_when_still_ours(self):
        self.acquire('A', 1)
        keys = ['im:node:A', 'im:nodeids', 'im:leases']
        self.eval('LUA_LEASE_RELEASE', keys, ['A', 0, 7])     # not ours: kept
        self.assertEqual(self.hget('im:node:A', 'epoch'), '1')
        self.eval('LUA_LEASE_RELEASE', keys, ['A', 1, 7])
        self.assertEqual(self.r.pipeline(['EXISTS', 'im:node:A'])[0], 0)
        self.assertIsNone(self.hget('im:nodeids', '7'))

    def test_nodes_lists_live_leases(self):
        self.acquire('A', 1)
        self.acquire('B', 2, slot=9)
        self.r.pipeline(['HSET', 'im:node:B', 'draining', '1'], ['DEL', 'im:node:A'])
        self.assertEqual(self.eval('LUA_NODES', ['im:leases'], ['im:']),
                         [['B', 'ws://x', 'x:1', '0', '1']])


if __name__ == '__main__':
    if not shutil.which('redis-server'):
        print('redis-server not found: skipped')
        sys.exit(0)
    unittest.main(verbosity=2)
