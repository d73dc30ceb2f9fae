"""Low-level helpers shared by the integration tests (test_echo.py and
imdclient.py / test_imd.py): waits with timeouts, scenario runner, the
server-process fixture, hand-built WebSocket frames and upgrade requests,
the binary IMP codec and the TCP length-prefix framing.

Every wait has a timeout; nothing sleeps to wait for a result.
"""
import asyncio
import base64
import functools
import os
import select
import signal
import struct
import subprocess
import tempfile
import time
import unittest

import websockets

T = 10.0                                    # default timeout of one wait, seconds


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


# ------------------------------------------------------------- scenarios ---

_TRANSPORTS = []                            # client transports of the running scenario


def track(transport):
    """Abort this client transport when the running scenario ends."""
    _TRANSPORTS.append(transport)


def run(coro, timeout=60):
    """Run one async scenario with an overall deadline; drop its sockets after."""
    async def guarded():
        try:
            return await within(coro, timeout, 'the whole scenario')
        finally:
            for t in _TRANSPORTS:
                t.abort()
            _TRANSPORTS.clear()
    return asyncio.run(guarded())


def scenario(timeout=60):
    """Decorator: an async test method run by run() with an overall deadline."""
    def wrap(fn):
        @functools.wraps(fn)
        def test(self):
            return run(fn(self), timeout)
        return test
    return wrap


# ---------------------------------------------------------- the servers ---

class ServerProcess:
    """A server process on kernel-picked ports; stderr goes to a file.

    Subclasses set NAME (as in its messages), PORT_RE (bytes regex of the
    "listening" line: groups kind and port), KINDS (the ports to wait for)
    and SANITIZER_RE; self.ports maps each kind to its port."""
    NAME = PORT_RE = SANITIZER_RE = None
    KINDS = ()

    def __init__(self, argv, env=None, cwd=None):
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env, cwd=cwd)
        self.ports, self.out = {}, b''

    def read_ports(self):
        """Read stdout until every port of KINDS is printed (or T passes)."""
        deadline, fd = time.monotonic() + T, self.proc.stdout.fileno()
        while not all(kind in self.ports for kind in self.KINDS):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise RuntimeError('%s did not print its ports: %r %s'
                                   % (self.NAME, self.out, self.log()))
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError('%s exited early (%s): %s'
                                   % (self.NAME, self.proc.wait(), self.log()))
            self.out += chunk
            for kind, port in self.PORT_RE.findall(self.out):
                self.ports[kind.decode()] = int(port)

    def log(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors='replace')

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=15, signal_it=True):
        """SIGTERM, wait for the exit, release everything: (status, stderr)."""
        if signal_it and self.alive():
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

    @classmethod
    def assert_clean_exit(cls, rc, log):
        check(not cls.SANITIZER_RE.search(log),
              'sanitizer report on %s stderr:\n' % cls.NAME + log)
        check(rc == 0, '%s exit status %r after SIGTERM, expected 0\n%s' % (cls.NAME, rc, log))


class ServerCase(unittest.TestCase):
    """One server_class(*server_args) per TestCase class; each test checks
    it is still healthy."""
    server_class = None
    server_args = ()

    @classmethod
    def setUpClass(cls):
        cls.srv = cls.server_class(*cls.server_args)

    @classmethod
    def tearDownClass(cls):
        cls.server_class.assert_clean_exit(*cls.srv.stop())

    def tearDown(self):
        log, name = self.srv.log(), self.srv.NAME
        self.assertFalse(self.srv.SANITIZER_RE.search(log),
                         'sanitizer report on %s stderr:\n' % name + log)
        self.assertTrue(self.srv.alive(), '%s died:\n' % name + log)


# ------------------------------------------------------------ WebSocket ---

OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def mask(key, data):
    if not data:
        return b''
    k = (key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, 'big') ^ int.from_bytes(k, 'big')).to_bytes(len(data), 'big')


def ws_frame(op, payload=b'', fin=True, rsv=0, masked=True, length=None):
    """One client frame (RFC 6455), built by hand. `length` declares a
    length without sending it."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    mbit = 0x80 if masked else 0
    if n < 126:
        hdr = bytes([b0, mbit | n])
    elif n < 65536:
        hdr = struct.pack('!BBH', b0, mbit | 126, n)
    else:
        hdr = struct.pack('!BBQ', b0, mbit | 127, n)
    if not masked:
        return hdr + payload
    key = os.urandom(4)
    return hdr + key + mask(key, payload)


async def read_ws_frame(reader, timeout=T, what='a WebSocket frame', strict=True):
    """(fin, opcode, payload) of one server frame; server frames are unmasked
    (checked, with no RSV bits, when strict)."""
    b0, b1 = await within(reader.readexactly(2), timeout, what)
    if strict:
        check(not b1 & 0x80, 'server frame is masked')
        check(not b0 & 0x70, 'server frame has RSV bits')
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack('!H', await within(reader.readexactly(2), timeout, what))[0]
    elif n == 127:
        n = struct.unpack('!Q', await within(reader.readexactly(8), timeout, what))[0]
    return bool(b0 & 0x80), b0 & 0x0F, await within(reader.readexactly(n), timeout, what)


def close_payload(code, reason=b''):
    return struct.pack('!H', code) + reason


def close_code(payload):
    """The status code of a close frame's payload."""
    return struct.unpack('!H', payload[:2])[0]


async def read_to_eof(reader, what='the server to close the connection',
                      reset=ConnectionResetError):
    """Everything until the server closes; a `reset` error counts as closed."""
    try:
        return await within(reader.read(), what=what)
    except reset:
        return b''


def new_key():
    """A fresh Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16)).decode()


def upgrade_request(port, path='/ws', key=None, version='13', upgrade='websocket',
                    connection='Upgrade', protocol=None, host=None):
    """The bytes of an upgrade request; a header whose value is None is left out."""
    lines = ['GET %s HTTP/1.1' % path, 'Host: ' + (host or '127.0.0.1:%d' % port)]
    for name, value in (('Upgrade', upgrade), ('Connection', connection),
                        ('Sec-WebSocket-Key', key), ('Sec-WebSocket-Version', version),
                        ('Sec-WebSocket-Protocol', protocol)):
        if value is not None:
            lines.append('%s: %s' % (name, value))
    return ('\r\n'.join(lines) + '\r\n\r\n').encode()


async def ws_connect(port, path='/ws', protocol='imp.json', what='the server'):
    """A `websockets` client (no pings, no compression, no size limit)."""
    ws = await within(websockets.connect(
        'ws://127.0.0.1:%d%s' % (port, path), subprotocols=[protocol] if protocol else None,
        ping_interval=None, compression=None, max_size=None, close_timeout=5), what=what)
    track(ws.transport)
    return ws


async def ws_close_code(ws):
    await within(ws.wait_closed(), what='the server to close the WebSocket')
    return ws.close_code


# ---------------------------------------- binary IMP and TCP framing ---

OPS = {'auth': 1, 'auth_ok': 2, 'msg': 3, 'ack': 4, 'sync': 5, 'sync_end': 6, 'ping': 7,
       'pong': 8, 'join': 9, 'leave': 10, 'error': 11, 'goaway': 12}
OP_NAMES = {v: k for k, v in OPS.items()}
# name: (key number, kind): S string, U unsigned big-endian, J JSON text, B boolean
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


def be(b):
    return int.from_bytes(b, 'big')


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


def bin_fields(b):
    """(key number, value bytes) of each field of a binary packet, in order."""
    i = 1
    while i < len(b):
        key, n, shift, i = b[i], 0, 0, i + 1
        while True:                     # uvarint length
            check(i < len(b), 'truncated varint in %r' % b[:80])
            n, shift, i = n | (b[i] & 0x7F) << shift, shift + 7, i + 1
            if not b[i - 1] & 0x80:
                break
        check(i + n <= len(b), 'truncated field in %r' % b[:80])
        yield key, b[i:i + n]
        i += n


def decode_bin(b):
    """One binary packet as {'op': name, field: value}; data stays JSON text."""
    check(len(b) >= 1 and b[0] in OP_NAMES, 'bad binary packet %r' % b[:80])
    out = {'op': OP_NAMES[b[0]], '_raw': b}
    for key, v in bin_fields(b):
        name, kind = KEY_BY_NUM.get(key, (key, None))
        if kind == 'U':
            v = be(v)
        elif kind == 'B':
            v = v == b'\x01'
        elif kind in ('S', 'J'):
            v = v.decode()
        out[name] = v
    return out


def tcp_frame(body):
    """A TCP frame: 4-byte big-endian length, then the packet."""
    return struct.pack('!I', len(body)) + body


async def read_tcp_frame(reader, timeout=T, what='a TCP frame'):
    """The body of one length-prefixed TCP frame."""
    n = struct.unpack('!I', await within(reader.readexactly(4), timeout, what))[0]
    return await within(reader.readexactly(n), timeout, what)
