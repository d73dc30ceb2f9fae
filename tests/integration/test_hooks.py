#!/usr/bin/python3
"""imd's back-end hooks (docs/HOOKS.md) against a real HTTP back end.

Run:  IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_hooks.py

The back end is an HTTP/1.1 server (asyncio, keep-alive, Content-Length
framing) running in this process on a kernel-picked port; each test
programs its answers and waits on the requests it receives. Every imd is
started with --hook-url pointing at it and must exit 0 on SIGTERM with no
sanitizer report. Nothing sleeps to wait for a result: a test that must see
"nothing happened" uses a later event as a barrier.
"""
import asyncio
import hashlib
import hmac
import json
import os
import socket
import sys
import unittest

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (Client, Imd, api, assert_clean_exit, check, connect,  # noqa: E402
                       parse_metrics, py_token, scenario, upgrade_status, within)

HOOK_SECRET = 'hook-signing-secret-for-tests'
DATA = '{"n":12345678901234567890,"s":"h\u00e9llo","a":[1, 2 ,{"b":null}]}'


class Req:
    def __init__(self, path, headers, body):
        self.path, self.headers, self.body = path, headers, body
        self.json = json.loads(body)


class Backend:
    """The business back end: records every request, answers through
    self.handler (async, Req -> (status, body bytes/str/dict))."""

    def __init__(self):
        self.requests = asyncio.Queue()     # every Req, in arrival order
        self.events = asyncio.Queue()       # every event object, batches unpacked
        self.handler = None
        self.framing = 'length'             # length | chunked | eof | drop (close after each)
        self.posts = 0
        self.bad_signatures = 0
        self.writers = set()

    async def start(self):
        self.server = await asyncio.start_server(self.serve, '127.0.0.1', 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = 'http://127.0.0.1:%d/imd/hooks' % self.port
        return self

    async def close(self):
        self.server.close()
        for w in list(self.writers):
            w.close()
        await self.server.wait_closed()

    async def serve(self, r, w):
        self.writers.add(w)
        try:
            while True:
                head = await r.readuntil(b'\r\n\r\n')
                lines = head.decode('latin-1').split('\r\n')
                method, path, version = lines[0].split(' ')
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, v = line.split(':', 1)
                        headers[k.strip().lower()] = v.strip()
                body = await r.readexactly(int(headers.get('content-length', '0')))
                check((method, version) == ('POST', 'HTTP/1.1'), 'bad request line %r' % lines[0])
                check(headers.get('content-type') == 'application/json', 'content type %r' % headers)
                want = 'sha256=' + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
                if headers.get('x-imd-signature') != want:
                    self.bad_signatures += 1
                req = Req(path, headers, body)
                self.posts += 1
                await self.requests.put(req)
                for e in req.json.get('events', [req.json]):
                    await self.events.put(e)
                status, answer = await self.handler(req) if self.handler else (200, {})
                if isinstance(answer, dict):
                    answer = json.dumps(answer)
                if isinstance(answer, str):
                    answer = answer.encode()
                head = b'HTTP/1.1 %d X\r\nContent-Type: application/json\r\n' % status
                if self.framing == 'chunked':
                    half = len(answer) // 2
                    w.write(head + b'Transfer-Encoding: chunked\r\n\r\n' + b''.join(
                        b'%x\r\n%s\r\n' % (len(p), p) for p in (answer[:half], answer[half:])
                        if p) + b'0\r\n\r\n')
                elif self.framing == 'eof':
                    w.write(head + b'Connection: close\r\n\r\n' + answer)
                else:
                    w.write(head + b'Content-Length: %d\r\n\r\n' % len(answer) + answer)
                await w.drain()
                if self.framing in ('eof', 'drop'):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(w)
            w.close()

    async def event(self, what='a hook event'):
        return await within(self.events.get(), what=what)

    async def next_of(self, kind, what=None):
        """The next event of that kind (others before it are skipped)."""
        while True:
            e = await self.event(what or 'a %s event' % kind)
            if e['event'] == kind:
                return e


def refused_port():
    """A local port nothing listens on (connections to it are refused)."""
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class HookCase(unittest.TestCase):
    """Each test starts its back end and its imd (self.start) and stops both."""

    async def start(self, *args, url=None, backend=True):
        self.be = await Backend().start() if backend else None
        url = url or self.be.url
        self.srv = await asyncio.to_thread(Imd, '--hook-url', url, '--hook-secret', HOOK_SECRET,
                                           *args)
        return self.srv

    async def stop(self):
        rc, log = await asyncio.to_thread(self.srv.stop)
        self.srv.remove_data()
        if self.be:
            await self.be.close()
            self.assertEqual(self.be.bad_signatures, 0, 'requests with a bad X-Imd-Signature')
        assert_clean_exit(rc, log)

    def uid(self, name):
        return '%s.%s' % (self._testMethodName[5:], name)

    def hang_backend(self):
        """The back end holds every request unanswered until the returned
        event is set."""
        never = asyncio.Event()

        async def handler(req):
            await never.wait()
            return 200, {}
        self.be.handler = handler
        return never

    async def inbox_last(self, uid):
        r = await api(self.srv, 'GET', '/v1/users/%s/inbox' % uid)
        self.assertEqual(r.status, 200, r)
        return r.json['last']

    def hold_answers(self):
        """The back end answers 200 {} once the returned event is set."""
        gate = asyncio.Event()

        async def handler(req):
            await gate.wait()
            return 200, {}
        self.be.handler = handler
        return gate

    async def metrics(self):
        r = await api(self.srv, 'GET', '/metrics')
        self.assertEqual(r.status, 200, r)
        return parse_metrics(r.body.decode())


# ================================================================ message ===

class TestMessageHook(HookCase):
    async def pair(self, *args):
        await self.start('--hook-message', 'on', '--hook-presence', 'off', *args)
        a = await connect(self.srv, 'json', self.uid('a'))
        b = await connect(self.srv, 'bin', self.uid('b'))
        return a, b

    @scenario()
    async def test_allow_reject_replace(self):
        a, b = await self.pair()
        verdicts = {'allow': {}, 'reject': {'reject': {'code': 451, 'reason': 'not here'}},
                    'replace': '{"data":{"n":12345678901234567890, "s":"\u00e9"}}'}

        async def handler(req):
            return 200, verdicts[req.json['cid'].split('-')[0]]
        self.be.handler = handler
        try:
            # allow: the event carries the message; b gets it untouched
            await a.send('msg', cid='allow-1', to=b.uid, data=DATA)
            e = await self.be.event('the message event')
            self.assertEqual({k: e[k] for k in ('event', 'uid', 'to', 'cid', 'data', 'device')},
                             {'event': 'message', 'uid': a.uid, 'to': b.uid, 'cid': 'allow-1',
                              'data': json.loads(DATA), 'device': 'd1'})
            self.assertNotIn('group', e)
            ack = await a.expect('ack', cid='allow-1')
            self.assertEqual(e['id'], ack['id'])
            await b.expect('msg', id=ack['id'], data=DATA, seq=1, **{'from': a.uid})
            self.assertEqual(await self.inbox_last(b.uid), 1)
            # reject: the sender gets the code and reason with its cid, nothing is stored
            await a.send('msg', cid='reject-1', to=b.uid, data='"spam"')
            await a.expect('error', code=451, reason='not here', cid='reject-1')
            self.assertEqual(await self.inbox_last(b.uid), 1)
            await b.barrier('no rejected message')
            # replace: stored and delivered with the back end's data, byte for byte
            await a.send('msg', cid='replace-1', to=b.uid, data='"original"')
            ack = await a.expect('ack', cid='replace-1')
            await b.expect('msg', id=ack['id'], seq=2,
                           data='{"n":12345678901234567890, "s":"\u00e9"}')
            self.assertEqual(await self.inbox_last(b.uid), 2)
            m = await self.metrics()
            for res in ('allow', 'reject', 'replace'):
                self.assertEqual(
                    m['imd_hook_requests_total{event="message",result="%s"}' % res], 1, res)
            self.assertEqual(m['imd_hook_latency_seconds_count'], 3)
            self.assertEqual(m['imd_hook_dropped_total'], 0)
        finally:
            await self.stop()

    @scenario()
    async def test_group_message_and_bad_answers(self):
        """A group msg carries "group"; an answer that is not a JSON object or
        not 2xx is a failure (fail closed: 503), a rejection without a code is 403."""
        a, b = await self.pair()
        g = self.uid('g')
        r = await api(self.srv, 'PUT', '/v1/groups/%s/members' % g, {'add': [a.uid, b.uid]})
        self.assertEqual(r.status, 200, r)
        answers = {'g': (200, {}), 'html': (200, '<html>'), 's500': (500, {}),
                   'nocode': (200, {'reject': {}})}

        async def handler(req):
            return answers[req.json['cid']]
        self.be.handler = handler
        try:
            ack = await a.msg('g', '1', group=g)
            e = await self.be.event()
            self.assertEqual((e['group'], e['uid'], e['data']), (g, a.uid, 1))
            self.assertNotIn('to', e)
            await b.expect('msg', id=ack['id'], group=g)
            for cid, code, reason in (('html', 503, 'message hook unavailable'),
                                      ('s500', 503, 'message hook unavailable'),
                                      ('nocode', 403, 'rejected')):
                await a.send('msg', cid=cid, to=b.uid, data='2')
                await a.expect('error', code=code, reason=reason, cid=cid)
            await b.barrier('nothing refused')
            m = await self.metrics()
            self.assertEqual(m['imd_hook_requests_total{event="message",result="error"}'], 2)
        finally:
            await self.stop()

    @scenario()
    async def test_order_kept_when_answers_come_back_reversed(self):
        """Ten messages of one connection asked in parallel, answered last
        first: acks, stored seqs and deliveries keep the sender's order."""
        a, b = await self.pair()
        n, arrived, gates = 10, [], {}
        all_in = asyncio.Event()

        async def handler(req):
            cid = req.json['cid']
            gates[cid] = asyncio.Event()
            arrived.append(cid)
            if len(arrived) == n:
                all_in.set()
            await gates[cid].wait()
            return 200, {}
        self.be.handler = handler
        try:
            for i in range(n):
                await a.send('msg', cid='m%d' % i, to=b.uid, data=str(i))
            await within(all_in.wait(), what='all %d asks in parallel' % n)
            self.assertEqual(sorted(arrived), sorted('m%d' % i for i in range(n)))
            for i in reversed(range(n)):
                gates['m%d' % i].set()
            for i in range(n):
                await a.expect('ack', cid='m%d' % i)
                await b.expect('msg', seq=i + 1, data=str(i))
        finally:
            await self.stop()

    @scenario()
    async def test_timeout_fail_closed(self):
        a, b = await self.pair('--hook-timeout', '300', '--hook-fail', 'closed')
        never = self.hang_backend()
        try:
            await a.send('msg', cid='t1', to=b.uid, data='1')
            await a.expect('error', code=503, reason='message hook timed out', cid='t1')
            self.assertEqual(await self.inbox_last(b.uid), 0)
            self.assertEqual(await self.inbox_last(a.uid), 0)
            await b.barrier('no message')
            m = await self.metrics()
            self.assertEqual(m['imd_hook_requests_total{event="message",result="timeout"}'], 1)
        finally:
            never.set()
            await self.stop()

    @scenario()
    async def test_timeout_fail_open(self):
        a, b = await self.pair('--hook-timeout', '300', '--hook-fail', 'open')
        never = self.hang_backend()
        try:
            await a.send('msg', cid='t1', to=b.uid, data='"kept"')
            ack = await a.expect('ack', cid='t1')
            await b.expect('msg', id=ack['id'], data='"kept"', seq=1)
        finally:
            never.set()
            await self.stop()

    @scenario()
    async def test_back_end_down(self):
        """Connection refused: fail closed answers 503, fail open stores."""
        for policy in ('closed', 'open'):
            with self.subTest(policy=policy):
                url = 'http://127.0.0.1:%d/' % refused_port()
                await self.start('--hook-message', 'on', '--hook-fail', policy, url=url,
                                 backend=False)
                try:
                    a = await connect(self.srv, 'tcp', self.uid('a' + policy))
                    b = await connect(self.srv, 'json', self.uid('b' + policy))
                    for i in range(3):
                        await a.send('msg', cid='c%d' % i, to=b.uid, data=str(i))
                    for i in range(3):
                        if policy == 'closed':
                            await a.expect('error', code=503, reason='message hook unavailable',
                                           cid='c%d' % i)
                        else:
                            await a.expect('ack', cid='c%d' % i)
                            await b.expect('msg', seq=i + 1, data=str(i))
                    self.assertEqual(await self.inbox_last(b.uid), 0 if policy == 'closed' else 3)
                    m = await self.metrics()
                    self.assertEqual(
                        m['imd_hook_requests_total{event="message",result="error"}'], 3)
                finally:
                    await self.stop()

    @scenario()
    async def test_answer_framings(self):
        """Chunked answers, answers ended by closing, and a back end that
        drops every keep-alive connection after one answer (imd resends on a
        fresh connection when a reused one dies before any answer byte)."""
        a, b = await self.pair()

        async def handler(req):
            return 200, '{"data":"%s"}' % req.json['cid']
        self.be.handler = handler
        try:
            n = 0
            for framing in ('chunked', 'eof', 'drop', 'length'):
                self.be.framing = framing
                for i in range(4):
                    cid = '%s-%d' % (framing, i)
                    n += 1
                    ack = await a.msg(cid, '0', to=b.uid)
                    await b.expect('msg', id=ack['id'], seq=n, data='"%s"' % cid)
            m = await self.metrics()
            self.assertEqual(m['imd_hook_requests_total{event="message",result="replace"}'], n)
        finally:
            await self.stop()

    @scenario()
    async def test_rooms_are_not_asked(self):
        a, b = await self.pair()
        try:
            room = self.uid('r')
            for c in (a, b):
                await c.send('join', room=room, cid='j')
                await c.expect('ack', cid='j')
            await a.send('msg', cid='r1', room=room, data='1')
            await a.expect('ack', cid='r1')
            await b.expect('msg', room=room, data='1')
            await a.msg('after', '2', to=b.uid)       # the first request the back end sees
            self.assertEqual((await self.be.event())['cid'], 'after')
        finally:
            await self.stop()


async def answers(c, n):
    """The next n answers on c by cid: (op, code, reason). An ack waits for
    the store, an error does not: either may come first."""
    got = {}
    for _ in range(n):
        m = await c.recv('the answers')
        got[m.get('cid')] = (m['op'], m.get('code'), m.get('reason'))
    return got


class TestBounds(HookCase):
    @scenario()
    async def test_queue_full(self):
        """One connection to the back end, one request may wait: an ask over
        that fails at once (fail closed: 503) and a presence event over it
        is dropped and counted."""
        await self.start('--hook-message', 'on', '--hook-connections', '1', '--hook-queue', '1')
        gate = self.hold_answers()
        try:
            a = await connect(self.srv, 'json', self.uid('a'))
            e = await self.be.event('online of a (held by the back end)')
            self.assertEqual((e['event'], e['uid']), ('online', a.uid))
            b = await connect(self.srv, 'json', self.uid('b'))      # its online is dropped
            await a.send('msg', cid='queued', to=b.uid, data='1')   # waits for the connection
            await a.send('msg', cid='over', to=b.uid, data='2')     # over the queue
            await a.barrier('no answer while the back end holds the first request')
            m = await self.metrics()
            self.assertEqual(m['imd_hook_dropped_total'], 1)
            self.assertEqual(m['imd_hook_requests_total{event="message",result="full"}'], 1)
            gate.set()
            self.assertEqual(await answers(a, 2), {'queued': ('ack', None, None),
                                                   'over': ('error', 503, 'message hook unavailable')})
            await b.expect('msg', data='1')
            await b.barrier('only the first message')
        finally:
            gate.set()
            await self.stop()


class TestBoundsAcrossWorkers(HookCase):
    @scenario()
    async def test_one_budget_for_every_worker(self):
        """With two workers, --hook-connections 1 --hook-queue 1 are the
        process's: a request of the other worker waits (that worker may not
        open a second connection), one more on either is refused, and the
        one connection moves to the worker that needs it."""
        from test_threads import on_worker
        await self.start('--threads', '2', '--hook-message', 'on', '--hook-presence', 'off',
                         '--hook-connections', '1', '--hook-queue', '1')
        gate = self.hold_answers()
        try:
            a = await on_worker(self.srv, 'json', self.uid('a'), 0, 'd')
            c = await on_worker(self.srv, 'json', self.uid('c'), 1, 'd')
            b = await connect(self.srv, 'bin', self.uid('b'))
            await a.send('msg', cid='first', to=b.uid, data='1')
            self.assertEqual((await self.be.event('the first ask, held'))['cid'], 'first')
            await c.send('msg', cid='waits', to=b.uid, data='2')   # worker 1: queued
            await c.barrier('the ask of worker 1 queued')
            await a.send('msg', cid='over', to=b.uid, data='3')    # over the queue of both
            await a.barrier('its answer waits behind the first (one order per connection)')
            m = await self.metrics()
            self.assertEqual(m['imd_hook_requests_total{event="message",result="full"}'], 1)
            self.assertEqual(m['imd_hook_pending'], 2)
            gate.set()
            self.assertEqual(await answers(a, 2), {'first': ('ack', None, None),
                                                   'over': ('error', 503, 'message hook unavailable')})
            self.assertEqual((await self.be.event('the ask of worker 1'))['cid'], 'waits')
            await c.expect('ack', cid='waits')
            # stored in answer order; the two workers push them to b each from
            # its own loop, so they may arrive either way round (b's client
            # orders by seq: PROTOCOL.md section 17)
            got = {}
            for _ in range(2):
                m = await b.expect('msg')
                got[m['data']] = m['seq']
            self.assertEqual(got, {'1': 1, '2': 2})
            await b.barrier('only those two')
        finally:
            gate.set()
            await self.stop()


# =============================================================== presence ===

class TestPresence(HookCase):
    @scenario()
    async def test_first_and_last_device_batched(self):
        await self.start()
        try:
            u, v = self.uid('u'), self.uid('v')
            d1 = await connect(self.srv, 'json', u, device='d1')
            e = await self.be.next_of('online')
            self.assertEqual((e['uid'], e['device'], e['platform']), (u, 'd1', 'web'))
            req = self.be.requests.get_nowait()
            self.assertEqual(list(req.json), ['events'])
            self.assertEqual(req.path, '/imd/hooks')
            d2 = await connect(self.srv, 'tcp', u, device='d2')     # not the first device
            v1 = await connect(self.srv, 'bin', v)
            e = await self.be.event('online of v')
            self.assertEqual((e['event'], e['uid']), ('online', v), 'a second online of u?')
            await d1.close()                                       # not the last device
            await d2.close()
            e = await self.be.event('offline of u')
            self.assertEqual((e['event'], e['uid']), ('offline', u), e)
            await v1.close()
            e = await self.be.event('offline of v')
            self.assertEqual((e['event'], e['uid']), ('offline', v), e)
            # many at once share POSTs
            posts = self.be.posts
            users = [self.uid('m%d' % i) for i in range(10)]
            await asyncio.gather(*(connect(self.srv, 'json', x) for x in users))
            got = set()
            while len(got) < 10:
                e = await self.be.next_of('online')
                got.add(e['uid'])
            self.assertEqual(got, set(users))
            self.assertLess(self.be.posts - posts, 10, 'no batch held two events')
        finally:
            await self.stop()

    @scenario()
    async def test_failed_batch_is_retried(self):
        await self.start()
        fails = [500, 503]

        async def handler(req):
            return (fails.pop(0) if fails else 200), {}
        self.be.handler = handler
        try:
            u = self.uid('u')
            await connect(self.srv, 'json', u)
            for attempt in range(3):
                e = await self.be.event('attempt %d' % attempt)
                self.assertEqual((e['event'], e['uid']), ('online', u))
            m = await self.metrics()
            self.assertEqual(m['imd_hook_requests_total{event="online",result="error"}'], 2)
            self.assertEqual(m['imd_hook_requests_total{event="online",result="ok"}'], 1)
        finally:
            await self.stop()


# ================================================================ connect ===

class TestConnectHook(HookCase):
    @scenario()
    async def test_instead_of_tokens(self):
        await self.start('--hook-connect', 'instead', '--hook-presence', 'off')

        async def handler(req):
            if req.json['token'] == 'open-sesame':
                return 200, {}
            return 200, {'reject': {'code': 403, 'reason': 'bad credentials'}}
        self.be.handler = handler
        try:
            u = self.uid('u')
            c = await Client.open(self.srv.ws, 'json')
            m = await c.auth(u, 'open-sesame', 'phone', 'ios')
            self.assertEqual(m['op'], 'auth_ok', m)
            e = await self.be.event()
            self.assertEqual({k: e[k] for k in ('event', 'uid', 'device', 'platform', 'token')},
                             {'event': 'connect', 'uid': u, 'device': 'phone',
                              'platform': 'ios', 'token': 'open-sesame'})
            self.assertTrue(e['peer'].startswith('127.0.0.1:'), e)
            # an imd token is nothing to the back end
            c2 = await Client.open(self.srv.tcp, 'tcp')
            m = await c2.auth(u, py_token(u, 'd1'))
            self.assertEqual((m['op'], m.get('code'), m.get('reason')),
                             ('error', 403, 'bad credentials'))
            self.assertEqual(await c2.closed(), 4401)
            # the authenticated client works
            ack = await c.msg('x', '1', to=u)
            self.assertTrue(ack['id'])
            # auth in the upgrade query: refused with HTTP 403, accepted with 101
            q = '/ws?uid=%s&token=%%s&device=q&platform=ios' % u
            self.assertEqual(await upgrade_status(self.srv.ws, q % 'wrong'), 403)
            self.assertEqual(await upgrade_status(self.srv.ws, q % 'open-sesame'), 101)
        finally:
            await self.stop()

    @scenario()
    async def test_also_after_tokens_and_failures(self):
        await self.start('--hook-connect', 'also', '--hook-presence', 'off',
                         '--hook-timeout', '300', '--hook-fail', 'closed')
        never = asyncio.Event()

        async def handler(req):
            uid = req.json['uid']
            if uid.endswith('.slow'):
                await never.wait()
            if uid.endswith('.banned'):
                return 200, {'reject': {'code': 403, 'reason': 'banned'}}
            return 200, {}
        self.be.handler = handler
        try:
            ok = await connect(self.srv, 'json', self.uid('ok'))
            self.assertEqual((await self.be.event())['uid'], ok.uid)
            # a bad token is refused by imd without asking
            c = await Client.open(self.srv.ws, 'json')
            m = await c.auth(self.uid('x'), 'not-a-token')
            self.assertEqual((m['op'], m['code'], m['reason']), ('error', 401, 'invalid token'))
            for name, code, reason in (('banned', 403, 'banned'),
                                       ('slow', 503, 'auth hook timed out')):
                c = await Client.open(self.srv.ws, 'json')
                m = await c.auth(self.uid(name), py_token(self.uid(name), 'd1'))
                self.assertEqual((m['op'], m.get('code'), m.get('reason')),
                                 ('error', code, reason))
                self.assertEqual(await c.closed(), 4401)
                self.assertEqual((await self.be.event())['uid'], self.uid(name),
                                 'the bad token was asked about')
            m = await self.metrics()
            self.assertEqual(m['imd_hook_requests_total{event="connect",result="allow"}'], 1)
            self.assertEqual(m['imd_hook_requests_total{event="connect",result="reject"}'], 1)
            self.assertEqual(m['imd_hook_requests_total{event="connect",result="timeout"}'], 1)
        finally:
            never.set()
            await self.stop()


# ==================================================================== CLI ===

class TestOptions(unittest.TestCase):
    def test_bad_hook_options_exit_2(self):
        from imdclient import run_cli
        for args, msg in ((['--hook-message', 'on'], 'need --hook-url'),
                          (['--hook-url', 'https://x/'], 'only http:// URLs'),
                          (['--hook-url', 'ftp://x/'], 'only http:// URLs'),
                          (['--hook-url', 'http://127.0.0.1:1/', '--hook-connect', 'maybe'],
                           "'off', 'instead' or 'also'"),
                          (['--hook-url', 'http://127.0.0.1:1/', '--hook-fail', 'half'],
                           "'closed' or 'open'"),
                          (['--hook-url', 'http://127.0.0.1:1/', '--hook-timeout', '0'],
                           'hook-timeout')):
            with self.subTest(args=args):
                rc, out, err = run_cli('--data', '/nonexistent-imd-hook-test', '--ws', 'off',
                                       '--tcp', 'off', '--http', 'off',
                                       '--secret', 'x' * 32, '--api-key', 'y' * 32, *args)
                self.assertEqual(rc, 2, (out, err))
                self.assertIn(msg, err)


if __name__ == '__main__':
    if len(sys.argv) > 2 and sys.argv[1] == '--imd':
        os.environ['IMD'] = sys.argv.pop(2)
        sys.argv.pop(1)
    unittest.main(verbosity=2)
