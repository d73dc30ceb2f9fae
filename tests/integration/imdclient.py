"""Test helpers for daemon/imd: the process fixture, token minting, IMP
clients (WebSocket JSON, WebSocket binary, raw TCP) and HTTP API calls.

Used by tests/integration/test_imd.py. Every wait has a timeout; nothing
sleeps to wait for a result.
"""
import asyncio
import base64
import functools
import hashlib
import hmac
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse

import websockets

T = 10.0                                    # default timeout of one wait, seconds
SECRET = 'integration-test-secret-0123456789'
API_KEY = 'integration-test-api-key'
SANITIZER_RE = re.compile(r'AddressSanitizer|LeakSanitizer|ERROR: \w*Sanitizer|runtime error:')
PORT_RE = re.compile(rb'imd: (ws|tcp|http) listening on \S+ port (\d+)')


def imd_path():
    path = os.environ.get('IMD')
    if not path:
        raise SystemExit('set IMD to the imd binary (or pass --imd PATH)')
    return path


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


class Timeout(AssertionError):
    pass


async def within(aw, timeout=T, what='the server'):
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise Timeout('timed out after %gs waiting for %s' % (timeout, what)) from None


_TRANSPORTS = []                            # client transports of the running scenario


def scenario(timeout=60):
    """Decorator: run an async test method with an overall deadline, then
    drop every client socket it opened."""
    def wrap(fn):
        @functools.wraps(fn)
        def test(self):
            async def guarded():
                try:
                    return await within(fn(self), timeout, 'the whole scenario')
                finally:
                    for t in _TRANSPORTS:
                        t.abort()
                    _TRANSPORTS.clear()
            return asyncio.run(guarded())
        return test
    return wrap


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


class Imd:
    """An imd process on kernel-picked ports with its own data directory."""

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
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([imd_path(), *args, *extra], stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=e, cwd=self.data)
        self.ports, self.out = {}, b''
        try:
            self._read_ports()
        except Exception:
            self.remove_data()
            raise
        self.ws, self.tcp, self.http = self.ports['ws'], self.ports['tcp'], self.ports['http']

    def _read_ports(self):
        deadline, fd = time.monotonic() + T, self.proc.stdout.fileno()
        while len(self.ports) < 3:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise RuntimeError('imd did not print its ports: %r %s' % (self.out, self.log()))
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError('imd exited early (%s): %s' % (self.proc.wait(), self.log()))
            self.out += chunk
            for kind, port in PORT_RE.findall(self.out):
                self.ports[kind.decode()] = int(port)

    def log(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors='replace')

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=15):
        """SIGTERM, wait for the exit: (status, stderr). Keeps the data dir."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = 'no exit within %ds' % timeout
        log = self.log()
        self.kill()
        return rc, log

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()

    def remove_data(self):
        if self.own_data:
            shutil.rmtree(self.data, ignore_errors=True)


def assert_clean_exit(rc, log):
    check(not SANITIZER_RE.search(log), 'sanitizer report on imd stderr:\n' + log)
    check(rc == 0, 'imd exit status %r after SIGTERM, expected 0\n%s' % (rc, log))


# ------------------------------------------------------------------ tokens ---

def py_token(uid, device='', exp=None, secret=SECRET):
    """The token of docs/TOKENS.md, computed here (device '' = any device)."""
    exp = int(time.time()) + 3600 if exp is None else exp
    dev = device if device else '*'
    msg = 'imd-token-v1\n%s\n%s\n%d' % (uid, dev, exp)
    mac = hmac.new(secret.encode(), msg.encode(), hashlib.sha256).digest()
    sig = base64.urlsafe_b64encode(mac).rstrip(b'=').decode()
    return '1.%d.%s.%s' % (exp, 'd' if device else '*', sig)


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
    return int(token.split('.')[1])


def forge(token):
    """Flip one character of the signature."""
    c = token[-5]
    return token[:-5] + ('A' if c != 'A' else 'B') + token[-4:]


# ------------------------------------------------------------ IMP codec ---

OPS = {'auth': 1, 'auth_ok': 2, 'msg': 3, 'ack': 4, 'sync': 5, 'sync_end': 6, 'ping': 7,
       'pong': 8, 'join': 9, 'leave': 10, 'error': 11, 'goaway': 12}
OP_NAMES = {v: k for k, v in OPS.items()}
KEYS = {'uid': (1, 'S'), 'token': (2, 'S'), 'device': (3, 'S'), 'platform': (4, 'S'),
        'conn': (5, 'S'), 'hb': (6, 'U'), 'cid': (7, 'S'), 'id': (8, 'S'), 'from': (9, 'S'),
        'to': (10, 'S'), 'group': (11, 'S'), 'room': (12, 'S'), 'ts': (13, 'U'),
        'seq': (14, 'U'), 'data': (15, 'J'), 'code': (16, 'U'), 'reason': (17, 'S'),
        'since': (18, 'U'), 'limit': (19, 'U'), 'last': (20, 'U'), 'more': (21, 'B'),
        'gap': (22, 'B')}
KEY_BY_NUM = {num: (name, kind) for name, (num, kind) in KEYS.items()}


def uvarint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_bin(op, **fields):
    """Binary IMP; `data` is JSON text (str), passed as its UTF-8 bytes."""
    out = bytearray([OPS[op]])
    for name, v in fields.items():
        num, kind = KEYS[name]
        if kind == 'U':
            v = v.to_bytes(max(1, (v.bit_length() + 7) // 8), 'big')
        elif kind == 'B':
            v = b'\x01' if v else b'\x00'
        else:
            v = v.encode()
        out += bytes([num]) + uvarint(len(v)) + v
    return bytes(out)


def decode_bin(b):
    """One binary packet as {'op': name, field: value}; data stays JSON text."""
    check(len(b) >= 1 and b[0] in OP_NAMES, 'bad binary packet %r' % b[:80])
    i, out = 1, {'op': OP_NAMES[b[0]], '_raw': b}
    while i < len(b):
        key, n, shift, i = b[i], 0, 0, i + 1
        while True:
            check(i < len(b), 'truncated varint in %r' % b[:80])
            n, shift, i = n | (b[i] & 0x7F) << shift, shift + 7, i + 1
            if not b[i - 1] & 0x80:
                break
        check(i + n <= len(b), 'truncated field in %r' % b[:80])
        v = b[i:i + n]
        i += n
        name, kind = KEY_BY_NUM.get(key, (key, None))
        if kind == 'U':
            v = int.from_bytes(v, 'big')
        elif kind == 'B':
            v = v == b'\x01'
        elif kind in ('S', 'J'):
            v = v.decode()
        out[name] = v
    return out


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
            r, w = await within(asyncio.open_connection('127.0.0.1', port, limit=1 << 22),
                                what='the TCP connection')
            _TRANSPORTS.append(w.transport)
            return cls(kind, reader=r, writer=w)
        ws = await within(websockets.connect(
            'ws://127.0.0.1:%d%s' % (port, path),
            subprotocols=['imp.bin' if kind == 'bin' else 'imp.json'],
            ping_interval=None, compression=None, max_size=None, close_timeout=5),
            what='the WebSocket handshake')
        _TRANSPORTS.append(ws.transport)
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
            body = encode_bin(op, **fields)
            await self.send_raw(struct.pack('!I', len(body)) + body)
        elif self.binary:
            await self.send_raw(encode_bin(op, **fields))
        else:
            await self.send_raw(encode_json(op, **fields))

    async def recv(self, what='a packet', timeout=T):
        if self.kind == 'tcp':
            n = struct.unpack('!I', await within(self.r.readexactly(4), timeout, what))[0]
            return decode_bin(await within(self.r.readexactly(n), timeout, what))
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
            await within(self.ws.wait_closed(), what='the server to close the WebSocket')
            return self.ws.close_code
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
    r, w = await within(asyncio.open_connection('127.0.0.1', port))
    _TRANSPORTS.append(w.transport)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write(('GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
             'Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n'
             'Sec-WebSocket-Protocol: imp.json\r\n\r\n' % (path, key)).encode())
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

def ws_frame(op, payload=b'', masked=True):
    n = len(payload)
    b0, mbit = 0x80 | op, 0x80 if masked else 0
    if n < 126:
        hdr = bytes([b0, mbit | n])
    elif n < 65536:
        hdr = struct.pack('!BBH', b0, mbit | 126, n)
    else:
        hdr = struct.pack('!BBQ', b0, mbit | 127, n)
    if not masked:
        return hdr + payload
    key = os.urandom(4)
    return hdr + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWS:
    """A hand-driven WebSocket client (query auth) for malformed traffic."""

    @classmethod
    async def connect(cls, srv, uid):
        self = cls()
        self.r, self.w = await within(asyncio.open_connection('127.0.0.1', srv.ws))
        _TRANSPORTS.append(self.w.transport)
        q = urllib.parse.urlencode({'uid': uid, 'token': py_token(uid), 'device': 'raw',
                                    'platform': 'raw'}, quote_via=urllib.parse.quote)
        key = base64.b64encode(os.urandom(16)).decode()
        self.w.write(('GET /ws?%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n'
                      'Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n'
                      'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: imp.json\r\n\r\n'
                      % (q, key)).encode())
        head = await within(self.r.readuntil(b'\r\n\r\n'), what='the upgrade response')
        check(head.startswith(b'HTTP/1.1 101'), 'upgrade refused: %r' % head)
        check((await self.frame())[1].startswith(b'{"op":"auth_ok"'), 'no auth_ok')
        return self

    def send(self, data):
        self.w.write(data)

    async def frame(self):
        """(opcode, payload) of one server frame."""
        b0, b1 = await within(self.r.readexactly(2), what='a WebSocket frame')
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack('!H', await within(self.r.readexactly(2)))[0]
        elif n == 127:
            n = struct.unpack('!Q', await within(self.r.readexactly(8)))[0]
        return b0 & 0x0F, await within(self.r.readexactly(n), what='a frame payload')

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
        try:
            rest = await within(self.r.read(), what='EOF after the close frame')
        except ConnectionError:
            rest = b''
        check(rest == b'', 'bytes after the close frame: %r' % rest[:80])
        return struct.unpack('!H', payload[:2])[0]
