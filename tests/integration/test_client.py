#!/usr/bin/python3
"""The C client library end to end: two examples/im-chat processes (one on
WebSocket JSON, one on raw TCP) talk through a real imd, which is killed
with SIGKILL mid-conversation and restarted on the same data directory and
ports. Every line typed must be shown exactly once, in order, on the other
side, and every outbox must drain.

Run:  IMD=build/daemon/imd IM_CHAT=build/examples/im-chat \
      CLIENT_POLL=build/examples/client-poll /usr/bin/python3 tests/integration/test_client.py

Every wait is on an output line of im-chat or imd, with a timeout.
"""
import http.server
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import (API_KEY, Imd, assert_clean_exit, check, encode_bin, freeze,  # noqa: E402
                       py_token, tcp_frame)

T = 30.0  # a reconnect after a restart may wait out a few backoff steps


def chat_path():
    path = os.environ.get('IM_CHAT')
    if not path:
        raise SystemExit('set IM_CHAT to the im-chat binary')
    return path


class Chat:
    """One im-chat process; its stdout lines are collected by a thread."""

    def __init__(self, uid, to, url, device, *extra, token=None):
        self.uid = uid
        argv = [chat_path(), '--url', url, '--uid', uid, '--token', token or py_token(uid, device),
                '--device', device, '--to', to, *extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            with self.cond:
                self.lines.append(raw.decode(errors='replace').rstrip('\n'))
                self.cond.notify_all()
        self.proc.stdout.close()
        with self.cond:
            self.lines.append(None)  # EOF
            self.cond.notify_all()

    def wait_for(self, pred, what, timeout=T):
        """Wait until pred(lines) is true; returns its value."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = pred([ln for ln in self.lines if ln is not None])
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError('%s: no %s within %.0fs; output:\n%s' % (
                        self.uid, what, timeout, '\n'.join(l for l in self.lines if l)))
                self.cond.wait(left)

    def count(self, prefix):
        with self.cond:
            return sum(1 for ln in self.lines if ln and ln.startswith(prefix))

    def wait_count(self, prefix, n, what):
        return self.wait_for(lambda ls: sum(1 for ln in ls if ln.startswith(prefix)) >= n, what)

    def say(self, *texts):
        self.proc.stdin.write(''.join(t + '\n' for t in texts).encode())
        self.proc.stdin.flush()

    def received(self, peer):
        """Texts shown from peer, in the order shown."""
        with self.cond:
            return [ln[len(peer) + 2:] for ln in self.lines
                    if ln and ln.startswith(peer + ': ')]

    def finish(self):
        """Close stdin; im-chat exits 0 once its outbox is empty."""
        self.proc.stdin.close()
        try:
            rc = self.proc.wait(T)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = 'no exit'
        self.reader.join(T)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.reader.join(T)


def shutdown(srv, chats):
    """Kill what is left of the chats; imd must exit cleanly on SIGTERM."""
    for c in chats:
        c.kill()
    rc, log = srv.stop()
    srv.remove_data()
    assert_clean_exit(rc, log)


def is_open(lines):
    return '* state open' in lines


class ClientTest(unittest.TestCase):

    def test_kill_9_mid_conversation(self):
        """SIGKILL imd while both sides have messages in flight; restart it on
        the same data dir and ports: nothing lost, nothing shown twice, in
        order, and every message acknowledged."""
        srv = Imd()
        data, ports = srv.data, dict(srv.ports)
        chats = []
        try:
            alice = Chat('alice', 'bob', 'ws://127.0.0.1:%d/ws' % ports['ws'], 'laptop')
            bob = Chat('bob', 'alice', 'tcp://127.0.0.1:%d' % ports['tcp'], 'phone')
            chats = [alice, bob]
            for c in chats:
                c.wait_for(is_open, 'open state')
            A = ['a%03d' % i for i in range(1, 171)]
            B = ['b%03d' % i for i in range(1, 91)]
            # a first part of the conversation, fully delivered
            alice.say(*A[:10])
            bob.say(*B[:5])
            bob.wait_for(lambda ls: 'alice: a010' in ls, 'a010')
            alice.wait_for(lambda ls: 'bob: b005' in ls, 'b005')
            # a burst on both sides ...
            alice.say(*A[10:110])
            bob.say(*B[5:55])
            alice.wait_count('* acked', 30, 'the 30th ack')
            # ... and more that imd certainly has not processed: it is stopped
            freeze(srv.proc)
            alice.say(*A[110:160])
            bob.say(*B[55:80])
            alice.wait_count('* queued', 160, 'alice queueing her burst')
            bob.wait_count('* queued', 80, 'bob queueing his burst')
            srv.proc.kill()
            srv.proc.wait()
            srv.kill()
            acked_at_kill = (alice.count('* acked'), bob.count('* acked'))
            self.assertLessEqual(acked_at_kill[0], 110)
            self.assertLessEqual(acked_at_kill[1], 55)
            # typed while the server is down: they wait in the outbox
            alice.say(*A[160:])
            bob.say(*B[80:])
            for c in chats:
                c.wait_for(lambda ls: any(ln.startswith('* closed') for ln in ls), 'close')
            srv = Imd('--ws', '127.0.0.1:%d' % ports['ws'], '--tcp', '127.0.0.1:%d' % ports['tcp'],
                      '--http', '127.0.0.1:%d' % ports['http'], data=data, listen=False)
            srv.own_data = True
            # both reconnect, sync, resend: everything arrives once, in order
            bob.wait_for(lambda ls: 'alice: ' + A[-1] in ls, 'the last of alice after the restart')
            alice.wait_for(lambda ls: 'bob: ' + B[-1] in ls, 'the last of bob after the restart')
            alice.wait_count('* acked', len(A), 'every ack of alice')
            bob.wait_count('* acked', len(B), 'every ack of bob')
            self.assertEqual(bob.received('alice'), A)
            self.assertEqual(alice.received('bob'), B)
            for c, n in ((alice, len(A)), (bob, len(B))):
                self.assertGreaterEqual(c.count('* state open'), 2, 'no reconnect seen')
                self.assertEqual(c.count('* acked'), n, 'an ack reported twice')
                self.assertEqual(c.finish(), 0)
            print('FIGURES client_kill9 alice_sent=%d bob_sent=%d acked_at_kill=%d+%d'
                  ' shown_by_bob=%d shown_by_alice=%d duplicates=0 lost=0' % (
                      len(A), len(B), acked_at_kill[0], acked_at_kill[1],
                      len(bob.received('alice')), len(alice.received('bob'))), flush=True)
        finally:
            shutdown(srv, chats)

    def test_gateway_fetch_falls_back(self):
        """--gateways pointing at an endpoint that does not answer a list:
        the client falls back to --url and works (binary WebSocket)."""
        srv = Imd()
        chats = []
        try:
            gw = 'http://127.0.0.1:%d/v1/gateways' % srv.http
            alice = Chat('gw.alice', 'gw.bob', 'ws://127.0.0.1:%d/ws' % srv.ws, 'd1',
                         '--gateways', gw, '--api-key', API_KEY, '--binary')
            bob = Chat('gw.bob', 'gw.alice', 'ws://127.0.0.1:%d/ws' % srv.ws, 'd1')
            chats = [alice, bob]
            for c in chats:
                c.wait_for(is_open, 'open state')
            check('* state resolving' in alice.lines, 'no fetch: ' + '\n'.join(alice.lines))
            alice.say('over binary')
            bob.wait_for(lambda ls: 'gw.alice: over binary' in ls, 'the message')
            self.assertEqual(alice.finish(), 0)
            self.assertEqual(bob.finish(), 0)
        finally:
            shutdown(srv, chats)

    def test_gateway_list_fetched(self):
        """--gateways answering a list (a stand-in HTTP server, checking the
        Bearer key and the uid): the client connects to the "ws" address of
        the gateway it names, not to the dead --url."""
        srv = Imd()
        seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, self.headers.get('Authorization')))
                body = json.dumps({'gateways': [
                    {'node': 'n1', 'ws': 'ws://127.0.0.1:%d/ws' % srv.ws,
                     'tcp': '127.0.0.1:%d' % srv.tcp, 'conns': 0}]}).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        httpd = http.server.HTTPServer(('127.0.0.1', 0), Handler)
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        chats = []
        try:
            gw = 'http://127.0.0.1:%d/v1/gateways' % httpd.server_address[1]
            # the configured URL is dead: only the fetched gateway works
            alice = Chat('gl.alice', 'gl.bob', 'ws://127.0.0.1:1/ws', 'd1',
                         '--gateways', gw, '--api-key', 'k3y')
            bob = Chat('gl.bob', 'gl.alice', 'ws://127.0.0.1:%d/ws' % srv.ws, 'd1')
            chats = [alice, bob]
            for c in chats:
                c.wait_for(is_open, 'open state')
            check(seen == [('/v1/gateways?uid=gl.alice', 'Bearer k3y')], 'requests: %r' % seen)
            check(alice.count('* connecting 127.0.0.1:%d' % srv.ws) == 1, '\n'.join(alice.lines))
            alice.say('via the list')
            bob.wait_for(lambda ls: 'gl.alice: via the list' in ls, 'the message')
            self.assertEqual(alice.finish(), 0)
            self.assertEqual(bob.finish(), 0)
        finally:
            httpd.shutdown()
            httpd.server_close()
            shutdown(srv, chats)

    def test_silent_server_detected(self):
        """imd frozen (SIGSTOP): the heartbeat gets no answer, the read-idle
        timeout closes the connection; once imd runs again the client is back
        and a message typed meanwhile is delivered."""
        srv = Imd()
        chats = []
        try:
            url = 'ws://127.0.0.1:%d/ws' % srv.ws
            alice = Chat('hb.alice', 'hb.bob', url, 'd1', '--ping-ms', '200',
                         '--pong-timeout-ms', '300')
            bob = Chat('hb.bob', 'hb.alice', url, 'd1')
            chats = [alice, bob]
            for c in chats:
                c.wait_for(is_open, 'open state')
            srv.proc.send_signal(signal.SIGSTOP)
            try:
                alice.wait_for(lambda ls: '* closed 1006 read idle timeout' in ls,
                               'the read-idle timeout')
                alice.say('after the freeze')
            finally:
                srv.proc.send_signal(signal.SIGCONT)
            alice.wait_count('* state open', 2, 'a reconnect')
            bob.wait_for(lambda ls: 'hb.alice: after the freeze' in ls, 'the message')
            self.assertEqual(alice.finish(), 0)
            self.assertEqual(bob.finish(), 0)
        finally:
            shutdown(srv, chats)

    def test_hand_written_loop(self):
        """examples/client-poll (the core on a poll() loop, raw TCP, no
        libevent) sends to an im-chat and exits on the ack."""
        srv = Imd()
        chats = []
        try:
            bob = Chat('pl.bob', 'pl.alice', 'ws://127.0.0.1:%d/ws' % srv.ws, 'd1')
            chats = [bob]
            bob.wait_for(is_open, 'open state')
            p = subprocess.run([os.environ['CLIENT_POLL'], '127.0.0.1', str(srv.tcp), 'pl.alice',
                                py_token('pl.alice', 'poll'), 'pl.bob', 'from a poll loop'],
                               capture_output=True, timeout=T)
            check(p.returncode == 0, 'client-poll: %r %r' % (p.returncode, p.stderr))
            check(re.match(rb'acked \d+\n$', p.stdout), p.stdout)
            bob.wait_for(lambda ls: 'pl.alice: from a poll loop' in ls, 'the message')
            self.assertEqual(bob.finish(), 0)
        finally:
            shutdown(srv, chats)

    def test_goaway_moves_to_the_next_gateway(self):
        """A stand-in gateway (raw TCP) accepts alice, takes her message
        without acking it, and sends goaway {reconnect_ms: 300}: she leaves
        it no sooner than 300 ms later, connects to the next gateway (a real
        imd), and the message reaches bob from there."""
        srv = Imd()
        lsock = socket.create_server(('127.0.0.1', 0))
        seen = {}
        gone = threading.Event()

        def fake_gateway():
            conn, _ = lsock.accept()
            with conn:
                f = conn.makefile('rb')

                def packet():
                    hdr = f.read(4)
                    return f.read(struct.unpack('!I', hdr)[0]) if len(hdr) == 4 else None

                seen['auth'] = packet()
                conn.sendall(tcp_frame(encode_bin('auth_ok', conn='fake', hb=30)))
                conn.sendall(tcp_frame(encode_bin('sync_end', last=0, more=False)))
                seen['msg'] = packet()
                conn.sendall(tcp_frame(bytes([0x0c, 0x17, 0x02]) + (300).to_bytes(2, 'big')))
                sent = time.monotonic()
                while packet() is not None:
                    pass
                seen['held_ms'] = (time.monotonic() - sent) * 1000
                f.close()
            gone.set()

        t = threading.Thread(target=fake_gateway, daemon=True)
        t.start()
        chats = []
        try:
            fake = 'tcp://127.0.0.1:%d' % lsock.getsockname()[1]
            alice = Chat('ga.alice', 'ga.bob', fake, 'd1', '--url',
                         'tcp://127.0.0.1:%d' % srv.tcp)
            bob = Chat('ga.bob', 'ga.alice', 'ws://127.0.0.1:%d/ws' % srv.ws, 'd1')
            chats = [alice, bob]
            for c in chats:
                c.wait_for(is_open, 'open state')
            alice.say('across a goaway')
            bob.wait_for(lambda ls: 'ga.alice: across a goaway' in ls, 'the message')
            check(gone.wait(T), 'the stand-in gateway was not left')
            check(seen['auth'][0] == 0x01 and seen['msg'][0] == 0x03, repr(seen))
            check(seen['held_ms'] >= 300, 'left after %.0f ms' % seen['held_ms'])
            check(alice.count('* connecting 127.0.0.1:%d' % srv.tcp) == 1, '\n'.join(alice.lines))
            alice.wait_count('* acked', 1, 'the ack from imd')
            self.assertEqual(alice.finish(), 0)
            self.assertEqual(bob.finish(), 0)
        finally:
            lsock.close()
            shutdown(srv, chats)

    def test_bad_token_stops(self):
        """A refused token stops the client (no reconnect loop): exit 1."""
        srv = Imd()
        c = None
        try:
            c = Chat('x', 'y', 'ws://127.0.0.1:%d/ws' % srv.ws, 'd1', token='not-a-token')
            rc = c.proc.wait(T)         # stdin stays open: only the refusal ends it
            c.reader.join(T)
            out = '\n'.join(c.lines[:-1])
            check(rc == 1, 'exit %r: %s' % (rc, out))
            check(re.search(r'^\* closed 4401 ', out, re.M), out)
            check(out.count('* connecting') == 1, 'reconnected after a refusal: ' + out)
        finally:
            shutdown(srv, [c] if c else [])


if __name__ == '__main__':
    unittest.main(verbosity=2)
