"""Test helpers for daemon/imd: the process fixture, token minting, IMP
clients (WebSocket JSON, WebSocket binary, raw TCP) and HTTP API calls.

Used by tests/integration/test_imd.py. Every wait has a timeout; nothing
sleeps to wait for a result.
"""
import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402
from wire import (T, check, decode_bin, encode_bin, scenario, tcp_frame,  # noqa: E402,F401
                  track, upgrade_request, within, ws_frame)

SECRET = 'integration-test-secret-0123456789'
API_KEY = 'integration-test-api-key'
SANITIZER_RE = re.compile(r'AddressSanitizer|LeakSanitizer|ERROR: \w*Sanitizer|runtime error:')
PORT_RE = re.compile(rb'imd: (ws|tcp|http) listening on \S+ port (\d+)')


# Flags that lift imd's message rate limits and per-receiver quota, for
# tests that push bursts on purpose to exercise delivery, not policing
# (test_ratelimit.py tests the limits themselves).
NO_RATE_LIMITS = ('--rate-msgs', '0', '--rate-user-msgs', '0', '--rate-receiver', '0')


def imd_path():
    path = os.environ.get('IMD')
    if not path:
        raise SystemExit('set IMD to the imd binary (or pass --imd PATH)')
    return path


# ------------------------------------------------------------- the daemon ---

def run_cli(*args, env=None, cwd=None, timeout=T):
    """Run `imd ARGS` to completion: (exit status, stdout, stderr)."""
    e = dict(os.environ)
    for k in list(e):
        if k.startswith('IMD_'):
            del e[k]
    e.update(env or {})
    p = subprocess.run([imd_path(), *args], capture_output=True, env=e, cwd=cwd,
                       timeout=timeout)
    return p.returncode, p.stdout.decode(errors='replace'), p.stderr.decode(errors='replace')


class Imd(wire.ServerProcess):
    """An imd process on kernel-picked ports with its own data directory
    (stop() keeps it; remove_data() removes it when it was made here)."""
    NAME = 'imd'
    PORT_RE = PORT_RE
    KINDS = ('ws', 'tcp', 'http')
    SANITIZER_RE = SANITIZER_RE

    def __init__(self, *extra, data=None, secret=SECRET, api_key=API_KEY, env=None,
                 listen=True):
        self.own_data = data is None
        self.data = data or tempfile.mkdtemp(prefix='imd-it-')
        self.secret, self.api_key = secret, api_key
        args = ['--data', self.data]
        if listen:
            args += ['--ws', '127.0.0.1:0', '--tcp', '127.0.0.1:0', '--http', '127.0.0.1:0']
        if secret is not None:
            args += ['--secret', secret]
        if api_key is not None:
            args += ['--api-key', api_key]
        e = {k: v for k, v in os.environ.items() if not k.startswith('IMD_')}
        e.update(env or {})
        super().__init__([imd_path(), *args, *extra], env=e, cwd=self.data)
        try:
            self.read_ports()
        except Exception:
            self.remove_data()
            raise
        self.ws, self.tcp, self.http = self.ports['ws'], self.ports['tcp'], self.ports['http']

    def remove_data(self):
        if self.own_data:
            shutil.rmtree(self.data, ignore_errors=True)


assert_clean_exit = Imd.assert_clean_exit


def freeze(proc):
    """SIGSTOP proc (a child) and return once it has stopped. The signal is
    only queued by kill(): a thread busy on another CPU, or in an
    uninterruptible wait (fsync), goes on for a while, and a test that then
    sends to the process must not find it still serving. The parent hears
    of the stop (waitpid WUNTRACED) when every thread has stopped."""
    proc.send_signal(signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status


def imd_with_nofile(nofile, *extra, **kw):
    """An Imd whose open-file limit is `nofile` (started through a small
    wrapper that sets `ulimit -n`)."""
    tmp = tempfile.mkdtemp(prefix='imd-it-wrap-')
    wrapper = os.path.join(tmp, 'imd')
    with open(wrapper, 'w') as f:
        f.write('#!/bin/sh\nulimit -n %d || exit 97\nexec "%s" "$@"\n' % (nofile, imd_path()))
    os.chmod(wrapper, 0o755)
    real = os.environ['IMD']
    os.environ['IMD'] = wrapper
    try:
        return Imd(*extra, **kw)  # started: the wrapper has exec'd imd
    finally:
        os.environ['IMD'] = real
        shutil.rmtree(tmp, ignore_errors=True)


class ImdCase(wire.ServerCase):
    """One imd (with server_args) per TestCase class; each test checks it is
    still healthy, and the class ends with a clean SIGTERM exit."""
    server_class = Imd

    @classmethod
    def tearDownClass(cls):
        rc, log = cls.srv.stop()
        cls.srv.remove_data()
        assert_clean_exit(rc, log)

    def uid(self, name):
        """A uid private to the running test."""
        return '%s.%s' % (self._testMethodName[5:], name)

    async def client(self, kind, name, **kw):
        return await connect(self.srv, kind, self.uid(name), **kw)


# ------------------------------------------------------------------ tokens ---

def py_token(uid, device='', exp=None, secret=SECRET, iat=None):
    """The token of docs/TOKENS.md, computed here (device '' = any device):
    v1, or v2 when iat (issue time, Unix ms) is given."""
    exp = int(time.time()) + 3600 if exp is None else exp
    dev = device if device else '*'
    if iat is None:
        msg = 'imd-token-v1\n%s\n%s\n%d' % (uid, dev, exp)
    else:
        msg = 'imd-token-v2\n%s\n%s\n%d\n%d' % (uid, dev, iat, exp)
    mac = hmac.new(secret.encode(), msg.encode(), hashlib.sha256).digest()
    sig = base64.urlsafe_b64encode(mac).rstrip(b'=').decode()
    if iat is None:
        return '1.%d.%s.%s' % (exp, 'd' if device else '*', sig)
    return '2.%d.%d.%s.%s' % (iat, exp, 'd' if device else '*', sig)


def cli_token(uid, device=None, ttl=None, secret=SECRET):
    """A token minted by `imd token`."""
    args = ['token', '--secret', secret, '--uid', uid]
    if device:
        args += ['--device', device]
    if ttl is not None:
        args += ['--ttl', str(ttl)]
    rc, out, err = run_cli(*args)
    check(rc == 0, 'imd token failed (%d): %s' % (rc, err))
    check(out.endswith('\n') and out.count('\n') == 1, 'imd token printed %r' % out)
    return out.strip()


def token_exp(token):
    return int(token.split('.')[-3])


def token_iat(token):
    """A v2 token's issue time (Unix ms); None for v1."""
    return int(token.split('.')[1]) if token.startswith('2.') else None


def forge(token):
    """Flip one character of the signature."""
    c = token[-5]
    return token[:-5] + ('A' if c != 'A' else 'B') + token[-4:]


# ------------------------------------------- IMP codec (binary: in wire) ---

def encode_json(op, **fields):
    """JSON IMP; `data` is inserted as raw JSON text."""
    parts = ['"op":' + json.dumps(op)]
    for name, v in fields.items():
        text = v if name == 'data' else json.dumps(v, ensure_ascii=False)
        parts.append('%s:%s' % (json.dumps(name), text))
    return '{' + ','.join(parts) + '}'


def decode_json(text):
    """Parse; 'data' is replaced by its exact text as sent by the server."""
    m = json.loads(text)
    check(isinstance(m, dict), 'not a JSON object: %r' % text[:200])
    m['_raw'] = text
    if 'data' in m:
        i = text.find(',"data":')
        check(i > 0 and text.endswith('}'), 'data is not the last member: %r' % text[:300])
        raw = text[i + 8:-1]
        check(json.loads(raw) == m['data'], 'cannot isolate data in %r' % text[:300])
        m['data'] = raw
    return m


# ----------------------------------------------------------------- clients ---

DEFAULT_PLATFORM = {'json': 'web', 'query': 'ios', 'bin': 'android', 'tcp': 'desktop'}


class Client:
    """One IMP connection. kind: 'json' (WebSocket imp.json, auth op),
    'query' (WebSocket imp.json, auth in the upgrade query), 'bin'
    (WebSocket imp.bin) or 'tcp' (raw TCP, length-prefixed binary).
    Received packets are dicts with str/int/bool values; data is JSON text."""

    def __init__(self, kind, uid=None, ws=None, reader=None, writer=None):
        self.kind, self.uid, self.ws, self.r, self.w = kind, uid, ws, reader, writer
        self.binary = kind in ('bin', 'tcp')
        self.auth_ok = None

    @classmethod
    async def open(cls, port, kind, path='/ws'):
        if kind == 'tcp':
            r, w = await open_tcp(port, 'the TCP connection', limit=1 << 22)
            return cls(kind, reader=r, writer=w)
        ws = await wire.ws_connect(port, path, 'imp.bin' if kind == 'bin' else 'imp.json',
                                   what='the WebSocket handshake')
        return cls(kind, ws=ws)

    def sockname(self):
        t = self.w.transport if self.kind == 'tcp' else self.ws.transport
        return t.get_extra_info('sockname')

    async def send_raw(self, payload):
        if self.kind == 'tcp':
            self.w.write(payload)
            await within(self.w.drain(), what='the send')
        else:
            await within(self.ws.send(payload), what='the send')

    async def send(self, op, **fields):
        if self.kind == 'tcp':
            await self.send_raw(tcp_frame(encode_bin(op, **fields)))
        elif self.binary:
            await self.send_raw(encode_bin(op, **fields))
        else:
            await self.send_raw(encode_json(op, **fields))

    async def recv(self, what='a packet', timeout=T):
        if self.kind == 'tcp':
            return decode_bin(await wire.read_tcp_frame(self.r, timeout, what))
        frame = await within(self.ws.recv(), timeout, what)
        if self.binary:
            check(isinstance(frame, bytes), 'text frame on imp.bin: %r' % frame[:80])
            return decode_bin(frame)
        check(isinstance(frame, str), 'binary frame on imp.json: %r' % frame[:80])
        return decode_json(frame)

    async def expect(self, op, what=None, **want):
        m = await self.recv(what or op)
        check(m['op'] == op, '%s (%s) expected %s, got %r' % (self.uid, self.kind, what or op,
                                                             m['_raw'][:300]))
        for k, v in want.items():
            check(m.get(k) == v, '%s: %s is %r, expected %r in %r' % (
                what or op, k, m.get(k), v, m['_raw'][:300]))
        return m

    async def barrier(self, what='nothing else'):
        """Ping and expect the pong as the very next packet: everything the
        server queued for us before it read the ping has arrived (and must
        not have been anything)."""
        await self.send('ping')
        m = await self.recv('the pong')
        check(m['op'] == 'pong', '%s (%s) expected %s, got %r' % (
            self.uid, self.kind, what, m['_raw'][:300]))

    async def msg(self, cid, data, **target):
        """Send a msg and return its ack."""
        await self.send('msg', cid=cid, **target, data=data)
        return await self.expect('ack', 'the ack of ' + cid, cid=cid)

    async def auth(self, uid, token, device='d1', platform=None):
        self.uid = uid
        await self.send('auth', uid=uid, token=token, device=device,
                        platform=platform or DEFAULT_PLATFORM[self.kind])
        return await self.recv('the answer to auth')

    async def closed(self):
        """Wait for the server to close: the close code (WebSocket), or the
        code of the last error op before EOF (TCP)."""
        if self.kind != 'tcp':
            return await wire.ws_close_code(self.ws)
        code = None
        while True:
            try:
                m = await self.recv('EOF')
            except (asyncio.IncompleteReadError, ConnectionError):
                return code
            code = m.get('code') if m['op'] == 'error' else code

    async def close(self):
        if self.kind == 'tcp':
            self.w.close()
        else:
            await within(self.ws.close(), what='the close handshake')


async def open_tcp(port, what='the server', **kw):
    """A plain stream connection, dropped when the scenario ends."""
    r, w = await within(asyncio.open_connection('127.0.0.1', port, **kw), what=what)
    track(w.transport)
    return r, w


async def connect(srv, kind, uid, device='d1', platform=None, token=None):
    """An authenticated client; token defaults to a device-bound one."""
    platform = platform or DEFAULT_PLATFORM[kind]
    token = token or py_token(uid, device)
    if kind == 'query':
        q = urllib.parse.urlencode({'uid': uid, 'token': token, 'device': device,
                                    'platform': platform}, quote_via=urllib.parse.quote)
        c = await Client.open(srv.ws, kind, '/ws?' + q)
        c.uid = uid
        c.auth_ok = await c.recv('auth_ok')
    else:
        c = await Client.open(srv.tcp if kind == 'tcp' else srv.ws, kind)
        c.auth_ok = await c.auth(uid, token, device, platform)
    check(c.auth_ok['op'] == 'auth_ok', 'auth of %s failed: %r' % (uid, c.auth_ok['_raw']))
    return c


async def upgrade_status(port, path):
    """Status code of a WebSocket upgrade request for path (then closed)."""
    r, w = await open_tcp(port)
    w.write(upgrade_request(port, path, wire.new_key(), protocol='imp.json', host='x'))
    head = await within(r.readuntil(b'\r\n\r\n'), what='the upgrade response')
    w.close()
    return int(head.split()[1])


# ------------------------------------------------------------------- HTTP ---

class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body
        self.ctype = headers.get('content-type', '')
        try:
            self.json = json.loads(body) if self.ctype.startswith('application/json') else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return 'HTTP %d %r' % (self.status, self.body[:300])


def http_call(port, method, path, body=None, key=API_KEY, headers=None, conn=None):
    """One request (blocking). body: dict/list (JSON-encoded), str or bytes."""
    own = conn is None
    conn = conn or http.client.HTTPConnection('127.0.0.1', port, timeout=T)
    h = dict(headers or {})
    if key is not None:
        h['Authorization'] = 'Bearer ' + key
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        if own:
            conn.close()


async def api(srv, method, path, body=None, **kw):
    return await within(asyncio.to_thread(http_call, srv.http, method, path, body, **kw),
                        what='%s %s' % (method, path))


def read_http_response(f):
    """Read one HTTP/1.1 response (Content-Length framed) from a file object."""
    status_line = f.readline()
    check(status_line.startswith(b'HTTP/1.1 '), 'bad status line %r' % status_line)
    headers = {}
    while True:
        line = f.readline()
        check(line, 'connection closed inside the response head')
        if line in (b'\r\n', b'\n'):
            break
        k, v = line.decode('latin-1').split(':', 1)
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get('content-length', '0')))
    return Resp(int(status_line.split()[1]), headers, body)


def raw_http(port, payload, responses):
    """Send payload in one write on a fresh socket and read `responses` responses."""
    with socket.create_connection(('127.0.0.1', port), timeout=T) as s:
        s.sendall(payload)
        f = s.makefile('rb')
        out = [read_http_response(f) for _ in range(responses)]
        f.close()
        return out


def request_bytes(method, path, body=b'', key=API_KEY, extra=''):
    head = '%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n' % (method, path)
    if key:
        head += 'Authorization: Bearer %s\r\n' % key
    if body or method in ('POST', 'PUT'):
        head += 'Content-Type: application/json\r\nContent-Length: %d\r\n' % len(body)
    return (head + extra + '\r\n').encode() + body


def parse_metrics(text):
    """{'name{labels}': value} of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            name, value = line.rsplit(' ', 1)
            out[name] = float(value)
    return out


# --------------------------------------------------- hand-made WebSocket ---

class RawWS:
    """A hand-driven WebSocket client (query auth) for malformed traffic."""

    @classmethod
    async def connect(cls, srv, uid):
        self = cls()
        self.r, self.w = await open_tcp(srv.ws)
        q = urllib.parse.urlencode({'uid': uid, 'token': py_token(uid), 'device': 'raw',
                                    'platform': 'raw'}, quote_via=urllib.parse.quote)
        self.w.write(upgrade_request(srv.ws, '/ws?' + q, wire.new_key(), protocol='imp.json',
                                     host='x'))
        head = await within(self.r.readuntil(b'\r\n\r\n'), what='the upgrade response')
        check(head.startswith(b'HTTP/1.1 101'), 'upgrade refused: %r' % head)
        check((await self.frame())[1].startswith(b'{"op":"auth_ok"'), 'no auth_ok')
        return self

    def send(self, data):
        self.w.write(data)

    async def frame(self):
        """(opcode, payload) of one server frame."""
        _, op, payload = await wire.read_ws_frame(self.r, strict=False)
        return op, payload

    async def json(self):
        op, payload = await self.frame()
        check(op == 1, 'expected a text frame, got op %d %r' % (op, payload[:80]))
        return json.loads(payload)

    async def close_code(self):
        """Skip to the close frame, return its code, and expect EOF after it."""
        while True:
            op, payload = await self.frame()
            if op == 8:
                break
        rest = await wire.read_to_eof(self.r, 'EOF after the close frame', ConnectionError)
        check(rest == b'', 'bytes after the close frame: %r' % rest[:80])
        return wire.close_code(payload)


# --------------------------------------------------------------- running ---

def main():
    """Run the calling test module: IMD from the environment or --imd PATH."""
    argv = list(sys.argv)
    if '--imd' in argv:
        i = argv.index('--imd')
        os.environ['IMD'] = argv[i + 1]
        del argv[i:i + 2]
    if not os.environ.get('IMD') or not os.access(os.environ['IMD'], os.X_OK):
        sys.exit('IMD=%r is not an executable imd binary' % os.environ.get('IMD'))
    import unittest
    unittest.main(module='__main__', argv=argv, verbosity=2)
