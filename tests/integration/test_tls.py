#!/usr/bin/python3
"""TLS on imd's listeners, with real clients: python3-websockets over wss://,
`openssl s_client` carrying raw TCP frames, curl over HTTPS for the API.

Run:  IMD=build/daemon/imd /usr/bin/python3 tests/integration/test_tls.py

Certificates are made by the test with `openssl req` in a temporary
directory. Every listener is on [::1]:0. Bad handshakes (garbage, plain HTTP
to a TLS port, a client stalling mid-handshake) must cost one connection and
never the loop: a wss chat keeps going meanwhile. SIGHUP loads a new
certificate for new connections while old ones stay up.
"""
import asyncio
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

import websockets

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imdclient import main as imdclient_main  # noqa: E402
from imdclient import (API_KEY, T, Imd, assert_clean_exit, decode_json, encode_json,  # noqa: E402
                       py_token, run_cli, scenario, within, NO_RATE_LIMITS)
from wire import check, decode_bin, encode_bin, tcp_frame, track  # noqa: E402

HANDSHAKE_MS = 1500       # --auth-timeout: also the TLS handshake timeout


def make_cert(d, name, kind='ec'):
    """A self-signed certificate for localhost / 127.0.0.1 / ::1 as d/name.{crt,key}."""
    key, crt = os.path.join(d, name + '.key'), os.path.join(d, name + '.crt')
    newkey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256'] if kind == 'ec' \
        else ['-newkey', 'rsa:2048']
    subprocess.run(['openssl', 'req', '-x509', *newkey, '-nodes', '-keyout', key, '-out', crt,
                    '-days', '2', '-subj', '/CN=imd-test-' + name,
                    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1'],
                   check=True, capture_output=True, timeout=60)
    return crt, key


def der_of(pem_path):
    with open(pem_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def client_ctx(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class TlsImd(Imd):
    """imd with TLS on every listener at [::1]:0 (no message rate limits: the
    chat rounds during the stalls go as fast as they are answered)."""

    def __init__(self, crt, key, *extra, **kw):
        super().__init__('--ws', '[::1]:0', '--tcp', '[::1]:0', '--http', '[::1]:0',
                         '--tls-cert', crt, '--tls-key', key,
                         '--auth-timeout', str(HANDSHAKE_MS), *NO_RATE_LIMITS, *extra,
                         listen=False, **kw)

    def wait_stdout(self, needle, timeout=T):
        """Read stdout until needle (bytes) shows up after what was read before."""
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        start = len(self.out)
        while needle not in self.out[start:]:
            left = deadline - time.monotonic()
            check(left > 0 and select.select([fd], [], [], left)[0],
                  'imd did not print %r; stderr: %s' % (needle, self.log()))
            chunk = os.read(fd, 4096)
            check(chunk, 'imd exited: %s' % self.log())
            self.out += chunk


class WssClient:
    """An authenticated imp.json client over wss://[::1]."""

    @classmethod
    async def connect(cls, port, ctx, uid):
        self = cls()
        self.uid = uid
        self.ws = await within(websockets.connect(
            'wss://[::1]:%d/ws' % port, ssl=ctx, subprotocols=['imp.json'], ping_interval=None,
            compression=None, close_timeout=5), what='the wss handshake')
        track(self.ws.transport)
        self.peer_der = self.ws.transport.get_extra_info('ssl_object').getpeercert(True)
        await self.send('auth', uid=uid, token=py_token(uid, 'd1'), device='d1', platform='web')
        await self.expect('auth_ok')
        return self

    async def send(self, op, **fields):
        await within(self.ws.send(encode_json(op, **fields)), what='a wss send')

    async def expect(self, op, **want):
        m = decode_json(await within(self.ws.recv(), what=op))
        check(m['op'] == op, '%s expected %s, got %r' % (self.uid, op, m['_raw'][:200]))
        for k, v in want.items():
            check(m.get(k) == v, '%s: %s is %r, expected %r' % (op, k, m.get(k), v))
        return m


async def chat_round(a, b, cid):
    """a sends b one message; b must get it (and acks it, as a client does:
    imd keeps at most max_inflight unacked pushes per connection)."""
    await a.send('msg', cid=cid, to=b.uid, data='"%s"' % cid)
    ack = await a.expect('ack', cid=cid)
    m = await b.expect('msg', id=ack['id'], data='"%s"' % cid)
    await b.send('ack', id=m['id'], seq=m['seq'])


def handshake_ends(port, first_bytes, what):
    """Connect, send first_bytes, and return how the server ends it: the
    bytes it sent before closing (a TLS alert or nothing). Fails when the
    connection is still open after the handshake timeout plus slack."""
    with socket.create_connection(('::1', port), timeout=T) as s:
        if first_bytes:
            s.sendall(first_bytes)
        got = b''
        deadline = time.monotonic() + HANDSHAKE_MS / 1000 + T
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return got
            except socket.timeout:
                break
            if not chunk:
                return got
            got += chunk
        raise AssertionError('%s: the server kept the connection open' % what)


def partial_client_hello(port):
    """The first 40 bytes of a real ClientHello (captured from Python's ssl)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname='localhost')
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    check(hello[:1] == b'\x16', 'not a handshake record: %r' % hello[:8])
    return hello[:40]


class TlsListeners(unittest.TestCase):
    """One imd with TLS on ws, tcp and http, all on [::1]:0."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix='imd-tls-')
        cls.crt, cls.key = make_cert(cls.dir, 'a')
        cls.ctx = client_ctx(cls.crt)
        cls.srv = TlsImd(cls.crt, cls.key)

    @classmethod
    def tearDownClass(cls):
        rc, log = cls.srv.stop()
        cls.srv.remove_data()
        shutil.rmtree(cls.dir, ignore_errors=True)
        assert_clean_exit(rc, log)

    def tearDown(self):
        self.assertTrue(self.srv.alive(), 'imd died:\n' + self.srv.log())

    def test_listeners_say_tls(self):
        for kind in (b'ws', b'tcp', b'http'):
            self.assertRegex(self.srv.out, kind + rb' listening on \[::1\]:0 port \d+ \(tls\)')

    @scenario()
    async def test_wss_chat(self):
        a = await WssClient.connect(self.srv.ws, self.ctx, 'wss.alice')
        b = await WssClient.connect(self.srv.ws, self.ctx, 'wss.bob')
        self.assertEqual(a.peer_der, der_of(self.crt))
        ssl_obj = a.ws.transport.get_extra_info('ssl_object')
        self.assertEqual(ssl_obj.version(), 'TLSv1.2')
        for i in range(20):
            await chat_round(a, b, 'c%d' % i)
        # a message bigger than one TLS record (16 KiB) both ways
        big = '"%s"' % ('x' * 60000)
        await a.send('msg', cid='big', to=b.uid, data=big)
        ack = await a.expect('ack', cid='big')
        m = await b.expect('msg', id=ack['id'], data=big)
        await b.send('ack', id=m['id'], seq=m['seq'])

    @scenario()
    async def test_plain_ws_to_tls_port_is_refused(self):
        with self.assertRaises(Exception):
            ws = await within(websockets.connect('ws://[::1]:%d/ws' % self.srv.ws,
                                                 open_timeout=T), what='the refusal')
            await ws.close()

    def test_tcp_frames_over_openssl_s_client(self):
        p = subprocess.Popen(['openssl', 's_client', '-connect', '[::1]:%d' % self.srv.tcp,
                              '-quiet', '-no_ign_eof', '-verify_return_error', '-CAfile', self.crt,
                              '-verify_ip', '::1'],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            p.stdin.write(tcp_frame(encode_bin('auth', uid='sc.u', token=py_token('sc.u', 'd1'),
                                               device='d1', platform='desktop')))
            p.stdin.write(tcp_frame(encode_bin('ping')))
            p.stdin.flush()
            buf, want = b'', []
            deadline = time.monotonic() + T
            while len(want) < 2:
                left = deadline - time.monotonic()
                self.assertTrue(left > 0 and select.select([p.stdout], [], [], left)[0],
                                'no frames from s_client: %r' % buf)
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    self.fail('s_client ended: %s' % p.stderr.read()[-500:])
                buf += chunk
                while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], 'big'):
                    n = int.from_bytes(buf[:4], 'big')
                    want.append(decode_bin(buf[4:4 + n]))
                    buf = buf[4 + n:]
            self.assertEqual([m['op'] for m in want], ['auth_ok', 'pong'])
        finally:
            p.stdin.close()
            try:
                p.wait(T)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()

    def test_session_resumption(self):
        """A client reconnecting with its session ticket skips the full
        handshake, on every listener."""
        for kind in ('ws', 'tcp', 'http'):
            port = getattr(self.srv, kind)
            session = None
            for i in range(2):
                with socket.create_connection(('::1', port), timeout=T) as s:
                    with self.ctx.wrap_socket(s, server_hostname='::1', session=session) as t:
                        self.assertEqual(t.session_reused, i == 1, kind)
                        self.assertEqual(t.version(), 'TLSv1.2')
                        session = t.session
                        self.assertTrue(session.has_ticket, kind)

    def curl(self, *args):
        r = subprocess.run(['curl', '-sS', '-v', '--cacert', self.crt, '--max-time', str(T),
                            '-H', 'Authorization: Bearer ' + API_KEY, *args],
                           capture_output=True, timeout=2 * T)
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    @scenario()
    async def test_https_api_with_curl(self):
        b = await WssClient.connect(self.srv.ws, self.ctx, 'https.bob')
        url = 'https://[::1]:%d' % self.srv.http
        rc, out, err = await asyncio.to_thread(self.curl, url + '/metrics')
        self.assertEqual(rc, 0, err)
        self.assertIn('ALPN: server accepted http/1.1', err)
        self.assertIn('imd_connections', out)
        rc, out, err = await asyncio.to_thread(
            self.curl, '-X', 'POST', '-H', 'Content-Type: application/json',
            '--data', '{"to":"https.bob","data":"via https"}', url + '/v1/messages')
        self.assertEqual(rc, 0, err)
        self.assertIn('"delivered":1', out)
        await b.expect('msg', data='"via https"')
        # plain HTTP to the HTTPS port: no answer, only this connection closed
        rc, out, err = await asyncio.to_thread(self.curl, 'http://[::1]:%d/metrics'
                                               % self.srv.http)
        self.assertNotEqual(rc, 0, out)

    @scenario(timeout=120)
    async def test_bad_handshakes_cost_one_connection(self):
        a = await WssClient.connect(self.srv.ws, self.ctx, 'bad.alice')
        b = await WssClient.connect(self.srv.ws, self.ctx, 'bad.bob')
        hello = partial_client_hello(self.srv.ws)
        cases = []
        for kind in ('ws', 'tcp', 'http'):
            port = getattr(self.srv, kind)
            cases += [(port, b'\x00garbage\xff' * 50, kind + ' garbage'),
                      (port, b'GET /ws HTTP/1.1\r\nHost: x\r\n\r\n', kind + ' plain HTTP'),
                      (port, hello, kind + ' stalled handshake'),
                      (port, b'', kind + ' silent client')]
        stalls = [asyncio.to_thread(handshake_ends, *c) for c in cases]
        t0 = time.monotonic()
        chats = 0
        pending = [asyncio.ensure_future(s) for s in stalls]
        while not all(p.done() for p in pending):     # the loop keeps serving meanwhile
            await chat_round(a, b, 'during%d' % chats)
            chats += 1
        for p in pending:
            p.result()
        self.assertGreater(chats, 5)
        took = time.monotonic() - t0
        self.assertGreaterEqual(took, HANDSHAKE_MS / 1000 * 0.9, 'stalls ended too early')
        await chat_round(b, a, 'after')


class TlsReload(unittest.TestCase):
    """SIGHUP: a new certificate for new connections; old ones stay up."""
    SERVER_ARGS = ()

    def test_sighup_reload(self):
        d = tempfile.mkdtemp(prefix='imd-tls-')
        try:
            crt, key = make_cert(d, 'live')
            first = der_of(crt)
            ctx = client_ctx(crt)
            srv = TlsImd(crt, key, *self.SERVER_ARGS)
            try:
                self.reload_scenario(srv, d, crt, key, first, ctx)
            finally:
                rc, log = srv.stop()
                srv.remove_data()
                assert_clean_exit(rc, log)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def reload_scenario(self, srv, d, crt, key, first, ctx):
        async def before():
            a = await WssClient.connect(srv.ws, ctx, 'hup.alice')
            self.assertEqual(a.peer_der, first)
            return a

        async def main():
            a = await before()
            # a broken certificate first: refused, the old one stays
            os.rename(crt, crt + '.good')
            with open(crt, 'w') as f:
                f.write('not a certificate\n')
            srv.proc.send_signal(1)
            await asyncio.to_thread(wait_stderr, srv, 'keeping the old certificate')
            os.rename(crt + '.good', crt)
            b0 = await WssClient.connect(srv.ws, ctx, 'hup.bob0')
            self.assertEqual(b0.peer_der, first)
            # now a real new one
            ncrt, nkey = make_cert(d, 'next', kind='rsa')
            os.replace(ncrt, crt)
            os.replace(nkey, key)
            srv.proc.send_signal(1)
            await asyncio.to_thread(srv.wait_stdout, b'TLS certificate reloaded (generation 2)')
            second = der_of(crt)
            self.assertNotEqual(first, second)
            b = await WssClient.connect(srv.ws, client_ctx(crt), 'hup.bob')
            self.assertEqual(b.peer_der, second)
            # the old connection is alive and still speaks over its session
            await chat_round(a, b, 'old-to-new')
            await chat_round(b, a, 'new-to-old')
            # the other listeners serve the new certificate too (on every
            # worker, with --threads: new connections land on either)
            for port in (srv.ws, srv.http, srv.tcp) * 4:
                raw = await asyncio.to_thread(peer_cert_raw, port)
                self.assertEqual(raw, second)
            await a.ws.close()
            await b.ws.close()
            await b0.ws.close()

        from wire import run
        run(main(), 90)


class TlsReloadThreads(TlsReload):
    """The same with two worker threads: each has TLS contexts of its own,
    and SIGHUP reloads every worker's before it says so."""
    SERVER_ARGS = ('--threads', '2')


def wait_stderr(srv, needle, timeout=T):
    deadline = time.monotonic() + timeout
    while needle not in srv.log():
        check(time.monotonic() < deadline, 'imd stderr lacks %r: %s' % (needle, srv.log()))
        time.sleep(0.02)   # stderr is a file: poll it


def peer_cert_raw(port):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(('::1', port), timeout=T) as s:
        with ctx.wrap_socket(s, server_hostname='localhost') as t:
            return t.getpeercert(True)


class TlsChoices(unittest.TestCase):
    """TLS from the environment, one listener kept plain from the config
    file, and the refusals of incomplete settings."""

    def test_env_and_plain_listener(self):
        d = tempfile.mkdtemp(prefix='imd-tls-')
        try:
            crt, key = make_cert(d, 'env')
            conf = os.path.join(d, 'imd.conf')
            with open(conf, 'w') as f:
                f.write('tls_plain = http\n')
            srv = Imd('--config', conf, env={'IMD_TLS_CERT': crt, 'IMD_TLS_KEY': key})
            try:
                self.assertRegex(srv.out, rb'ws listening on \S+ port \d+ \(tls\)')
                self.assertRegex(srv.out, rb'tcp listening on \S+ port \d+ \(tls\)')
                self.assertRegex(srv.out, rb'http listening on \S+ port \d+\n')
                r = subprocess.run(['curl', '-sS', '--max-time', str(T), '-H',
                                    'Authorization: Bearer ' + API_KEY,
                                    'http://127.0.0.1:%d/metrics' % srv.http],
                                   capture_output=True, timeout=2 * T)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertIn(b'imd_connections', r.stdout)
                with socket.create_connection(('127.0.0.1', srv.ws), timeout=T) as s:
                    ctx = client_ctx(crt)
                    with ctx.wrap_socket(s, server_hostname='127.0.0.1') as t:
                        self.assertEqual(t.getpeercert(True), der_of(crt))
            finally:
                rc, log = srv.stop()
                srv.remove_data()
                assert_clean_exit(rc, log)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_plain_ipv6_listeners(self):
        """[::1]:0 works on every listener without TLS too (one address parser)."""
        srv = Imd('--ws', '[::1]:0', '--tcp', '[::1]:0', '--http', '[::1]:0', listen=False)
        try:
            for kind in (b'ws', b'tcp', b'http'):
                self.assertRegex(srv.out, kind + rb' listening on \[::1\]:0 port \d+\n')
            r = subprocess.run(['curl', '-sS', '--max-time', str(T), '-H',
                                'Authorization: Bearer ' + API_KEY,
                                'http://[::1]:%d/metrics' % srv.http],
                               capture_output=True, timeout=2 * T)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(b'imd_connections', r.stdout)
            for kind in ('ws', 'tcp'):
                with socket.create_connection(('::1', getattr(srv, kind)), timeout=T):
                    pass
        finally:
            rc, log = srv.stop()
            srv.remove_data()
            assert_clean_exit(rc, log)

    def test_shutdown_drops_pending_handshakes(self):
        """SIGTERM does not wait for handshakes that have not finished: it
        has no channel to say goodbye on them."""
        d = tempfile.mkdtemp(prefix='imd-tls-')
        try:
            crt, key = make_cert(d, 'bye')
            srv = TlsImd(crt, key, '--auth-timeout', '60000')
            socks = []
            try:
                for kind in ('ws', 'tcp', 'http'):
                    port = getattr(srv, kind)
                    socks.append(socket.create_connection(('::1', port), timeout=T))
                    s = socket.create_connection(('::1', port), timeout=T)
                    s.sendall(partial_client_hello(port))
                    socks.append(s)
                # a full handshake after them: the loop has been through its accepts
                self.assertEqual(peer_cert_raw(srv.http), der_of(crt))
                t0 = time.monotonic()
                rc, log = srv.stop()
                self.assertLess(time.monotonic() - t0, 2.5, 'waited for the handshakes')
                assert_clean_exit(rc, log)
            finally:
                for s in socks:
                    s.close()
                if srv.alive():
                    srv.stop()
                srv.remove_data()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_incomplete_or_broken_settings(self):
        d = tempfile.mkdtemp(prefix='imd-tls-')
        try:
            crt, key = make_cert(d, 'x')
            other_crt, _ = make_cert(d, 'y')
            data = os.path.join(d, 'data')
            common = ['--data', data, '--ws', '127.0.0.1:0', '--tcp', '127.0.0.1:0',
                      '--http', '127.0.0.1:0', '--secret', 'x' * 32, '--api-key', API_KEY]
            for args, why in ((['--tls-cert', crt], 'both --tls-cert and --tls-key'),
                              (['--tls-cert', crt, '--tls-key', os.path.join(d, 'none')],
                               'cannot load key'),
                              (['--tls-cert', other_crt, '--tls-key', key], 'does not match'),
                              (['--tls-cert', crt, '--tls-key', key, '--tls-plain', 'ftp'],
                               "'ftp' is not"),
                              (['--tls-plain', 'ws,htp'], "'htp' is not")):
                rc, out, err = run_cli(*common, *args)
                self.assertEqual(rc, 2, (args, out, err))
                self.assertIn(why, err)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def main():
    if not shutil.which('openssl') or not shutil.which('curl'):
        sys.exit('openssl and curl are needed')
    imdclient_main()


if __name__ == '__main__':
    main()
