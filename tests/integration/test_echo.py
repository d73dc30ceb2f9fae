#!/usr/bin/python3
"""End-to-end tests of examples/im-echo over real sockets.

Run:  IM_ECHO=build/examples/im-echo /usr/bin/python3 tests/integration/test_echo.py
  or  /usr/bin/python3 tests/integration/test_echo.py --im-echo build/examples/im-echo

Needs the `websockets` package (10.x asyncio client API). Every server is
started on port 0, every wait has a timeout, and every server must exit 0 on
SIGTERM with nothing from AddressSanitizer / UBSan on its stderr.
"""
import asyncio
import base64
import functools
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import sys
import time
import unittest

sys.dont_write_bytecode = True          # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire  # noqa: E402
from wire import (KEY_BY_NUM, OP_BIN, OP_CLOSE, OP_CONT, OP_NAMES, OP_PING,  # noqa: E402
                  OP_PONG, OP_TEXT, T, Timeout, be, bin_fields, check, close_code,
                  close_payload, read_tcp_frame, read_to_eof, read_ws_frame, run, scenario,
                  tcp_frame, track, upgrade_request, within, ws_close_code, ws_connect,
                  ws_frame)
from wire import encode_bin as imp_bin  # noqa: E402

IM_ECHO = None      # path of the binary, set by main()
MAX_MESSAGE = 65536  # im-echo's default --max-message

# ---------------------------------------------------------------- helpers ---

class EchoServer(wire.ServerProcess):
    """An im-echo process on kernel-picked ports; stderr goes to a file."""
    NAME = 'im-echo'
    PORT_RE = re.compile(rb'im-echo: (ws|tcp) listening on \S+ port (\d+)')
    KINDS = ('ws', 'tcp')
    SANITIZER_RE = re.compile(r'ERROR: \w*Sanitizer|runtime error:')

    def __init__(self, *extra):
        super().__init__([IM_ECHO, '--ws', '127.0.0.1:0', '--tcp', '127.0.0.1:0', *extra])
        self.read_ports()
        self.ws_port, self.tcp_port = self.ports['ws'], self.ports['tcp']


assert_clean_exit = EchoServer.assert_clean_exit


class ServerCase(wire.ServerCase):
    """One im-echo per TestCase class; each test checks it is still healthy."""
    server_class = EchoServer

async def open_tcp(port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    await within(asyncio.get_running_loop().sock_connect(s, ('127.0.0.1', port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    r, w = await asyncio.open_connection(sock=s, limit=1 << 22)
    track(w.transport)
    return r, w

_cids = itertools.count(1)


def fresh_cid(prefix):
    """A cid not used before: the server drops a repeated cid as a retransmit."""
    return '%s%d' % (prefix, next(_cids))


def msg_text(cid, data):
    return '{"op":"msg","cid":%s,"data":%s}' % (json.dumps(cid), data)

def check_echo(ack_text, ack, echo_text, echo, cid, data):
    """ack then msg with the same id and byte-identical data; returns the id."""
    check(ack.get('op') == 'ack' and ack.get('cid') == cid and ack.get('id'),
          'expected ack for %s, got %s' % (cid, ack_text[:200]))
    check(echo.get('op') == 'msg' and echo.get('id') == ack['id'],
          'expected echo of %s, got %s' % (ack['id'], echo_text[:200]))
    check(echo_text.endswith('"data":' + data + '}'),
          'data not byte-identical:\n sent %r\n got  %r' % (data[:200], echo_text[:300]))
    return ack['id']

AUTH = '{"op":"auth","uid":%s,"token":%s,"device":"d1","platform":"web"}'

# ---- WebSocket, by hand ----
GUID = b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

async def read_http_head(reader):
    head = await within(reader.readuntil(b'\r\n\r\n'), what='an HTTP response')
    lines = head.decode('latin-1').split('\r\n')
    headers = {}
    for line in lines[1:]:
        if ':' in line:
            k, v = line.split(':', 1)
            headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers

async def http_reject(port, request):
    """Send a request that must be refused: (status, headers, body); then EOF."""
    r, w = await open_tcp(port)
    w.write(request)
    status, headers = await read_http_head(r)
    return status, headers, await read_to_eof(r)


class RawWS:
    """A hand-driven WebSocket client for malformed traffic."""

    def __init__(self, r, w, headers):
        self.r, self.w, self.headers = r, w, headers

    @classmethod
    async def connect(cls, port, path='/ws', protocol=None, rcvbuf=None, uid=None):
        """Upgrade (checking the accept key); then authenticate when uid is given."""
        r, w = await open_tcp(port, rcvbuf)
        key = wire.new_key()
        w.write(upgrade_request(port, path, key, protocol=protocol))
        status, headers = await read_http_head(r)
        check(status == 101, 'upgrade refused: %d' % status)
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        check(headers.get('sec-websocket-accept') == accept, 'bad Sec-WebSocket-Accept')
        self = cls(r, w, headers)
        if uid:
            await self.auth(uid)
        return self

    def send(self, *frames):
        self.w.write(b''.join(frames))

    def send_text(self, text):
        self.send(ws_frame(OP_TEXT, text.encode()))

    async def frame(self, timeout=T):
        return await read_ws_frame(self.r, timeout)

    async def json(self, what='a text frame'):
        fin, op, payload = await read_ws_frame(self.r, T, what)
        check(fin and op == OP_TEXT, 'expected %s, got op %d %r' % (what, op, payload[:80]))
        return payload.decode(), json.loads(payload)

    async def auth(self, uid='raw'):
        self.send_text(AUTH % (json.dumps(uid), '"t"'))
        _, m = await self.json('auth_ok')
        check(m['op'] == 'auth_ok', 'auth failed: %r' % m)
        return m

    async def echo(self, data, cid=None, send=True):
        cid = cid or fresh_cid('r')
        if send:
            self.send_text(msg_text(cid, data))
        ack = await self.json('the ack of ' + cid)
        return check_echo(*ack, *(await self.json('the echo of ' + cid)), cid, data)

    async def expect_close(self, code, reply=False):
        """Read up to the server's close frame, check its code, then EOF."""
        while True:
            try:
                fin, op, payload = await self.frame()
            except asyncio.IncompleteReadError as e:
                raise AssertionError('connection ended without a close frame (%r)' % e.partial)
            if op == OP_CLOSE:
                break
        check(len(payload) >= 2, 'close frame without a code')
        got = close_code(payload)
        check(got == code, 'close code %d, expected %d' % (got, code))
        if reply:
            self.send(ws_frame(OP_CLOSE, close_payload(code)))
        rest = await read_to_eof(self.r)
        check(rest == b'', 'bytes after the close frame: %r' % rest[:80])


# ---- websockets library clients ----

async def ws_json(ws, what='a text message'):
    text = await within(ws.recv(), what=what)
    check(isinstance(text, str), 'expected %s, got %r' % (what, text[:80]))
    return text, json.loads(text)

async def ws_auth(ws, uid='alice', token='t'):
    await ws.send(AUTH % (json.dumps(uid), json.dumps(token)))
    return (await ws_json(ws, 'the answer to auth'))[1]

async def ws_client(port, uid='alice'):
    ws = await ws_connect(port)
    m = await ws_auth(ws, uid)
    check(m['op'] == 'auth_ok', 'auth failed: %r' % m)
    return ws

async def ws_echo(ws, data, cid=None, send=True):
    cid = cid or fresh_cid('c')
    if send:
        await ws.send(msg_text(cid, data))
    ack = await ws_json(ws, 'the ack of ' + cid)
    return check_echo(*ack, *(await ws_json(ws, 'the echo of ' + cid)), cid, data)

# ---- IMP binary form and raw TCP framing ----

def parse_imp_bin(b):
    """(op name, {field name: bytes}) of one binary packet."""
    check(len(b) >= 1, 'empty binary packet')
    fields = {KEY_BY_NUM.get(key, (key,))[0]: v for key, v in bin_fields(b)}
    return OP_NAMES.get(b[0], b[0]), fields

def check_bin_echo(ack, msg, cid, data):
    check(ack['cid'] == cid.encode() and ack.get('id'), 'bad ack %r' % ack)
    check(msg['id'] == ack['id'], 'echo id %r != ack id %r' % (msg.get('id'), ack['id']))
    check(msg['data'] == data.encode(), 'data not byte-identical: %r' % msg.get('data', b'')[:200])
    return ack['id']


class TCPClient:
    def __init__(self, r, w):
        self.r, self.w = r, w

    @classmethod
    async def connect(cls, port, rcvbuf=None, uid=None):
        self = cls(*(await open_tcp(port, rcvbuf)))
        if uid:
            await self.auth(uid)
        return self

    def send(self, op, **fields):
        self.w.write(tcp_frame(imp_bin(op, **fields)))

    async def packet(self, timeout=T, what='a TCP frame'):
        return parse_imp_bin(await read_tcp_frame(self.r, timeout, what))

    async def expect(self, op, what=None):
        got, f = await self.packet(what=what or op)
        check(got == op, 'expected %s, got %s %r' % (op, got, f))
        return f

    async def auth(self, uid='tcp'):
        self.send('auth', uid=uid, token='t', device='d', platform='tcp')
        return await self.expect('auth_ok')

    async def echo(self, data, cid=None):
        cid = cid or fresh_cid('t')
        self.send('msg', cid=cid, data=data)
        ack = await self.expect('ack', 'the ack of ' + cid)
        return check_bin_echo(ack, await self.expect('msg', 'the echo of ' + cid), cid, data)

    async def expect_error_close(self, code):
        f = await self.expect('error')
        check(be(f['code']) == code, 'error code %d, expected %d' % (be(f['code']), code))
        rest = await read_to_eof(self.r)
        check(rest == b'', 'bytes after the closing error: %r' % rest[:80])


DATA_CASES = [
    '{"a":1}',
    '{"nested":{"list":[1,2.5,-3e-7,true,false,null,{"deep":["x",{"y":{}}]}]},"e":[]}',
    '"h\u00e9llo w\u00f6rld \u2014 \u4e2d\u6587 \U0001F600"',
    r'"\u00e9\ud83d\ude00 \"q\" \\ \n\t\/"',
    '{ "spaced" : [ 1 , 2 ] ,\n\t"k" : "v" }',
    '[]', '{}', '""', '0', '-0.0e+0', '12345678901234567890123', 'true', 'null',
    '[' * 40 + ']' * 40,
    json.dumps({'emoji': '\U0001F600' * 100, 'zh': '\u4e2d' * 100}, ensure_ascii=False),
    '"' + 'x' * 30000 + '"',
]

# ------------------------------------------------------------ test cases ---


class TestAuth(ServerCase):
    @scenario()
    async def test_auth_op(self):
        ws = await ws_connect(self.srv.ws_port)
        m = await ws_auth(ws)
        self.assertEqual(m['op'], 'auth_ok')
        self.assertTrue(isinstance(m['conn'], str) and m['conn'])
        self.assertEqual(m['hb'], 30)
        await ws_echo(ws, '{"hello":"world"}')

    @scenario()
    async def test_auth_query(self):
        ws = await ws_connect(self.srv.ws_port, '/ws?uid=bob&token=x&device=d2&platform=ios')
        _, m = await ws_json(ws, 'auth_ok')
        self.assertEqual(m['op'], 'auth_ok')
        self.assertTrue(m['conn'])
        await ws_echo(ws, '[1,"two",{"3":null}]')
        # a msg frame in the same write as the upgrade request is kept for after the 101
        r, w = await open_tcp(self.srv.ws_port)
        w.write(upgrade_request(self.srv.ws_port, '/ws?uid=eager&token=t', 'A' * 22 + '==')
                + ws_frame(OP_TEXT, msg_text('e', '[2]').encode()))
        self.assertEqual((await read_http_head(r))[0], 101)
        raw = RawWS(r, w, {})
        self.assertEqual((await raw.json('auth_ok'))[1]['op'], 'auth_ok')
        await raw.echo('[2]', 'e', send=False)

    @scenario()
    async def test_bad_token_op_closes_4401(self):
        for creds in (('alice', ''), ('', 't')):
            ws = await ws_connect(self.srv.ws_port)
            m = await ws_auth(ws, *creds)
            self.assertEqual((m['op'], m['code']), ('error', 401), m)
            self.assertEqual(await ws_close_code(ws), 4401)

    @scenario()
    async def test_bad_token_query_403(self):
        key = base64.b64encode(os.urandom(16)).decode()
        for path in ('/ws?uid=bob&token=', '/ws?uid=bob', '/ws?uid=&token=x'):
            status, _, _ = await http_reject(
                self.srv.ws_port, upgrade_request(self.srv.ws_port, path, key))
            self.assertEqual(status, 403, path)

    @scenario()
    async def test_msg_before_auth_401_connection_stays(self):
        ws = await ws_connect(self.srv.ws_port)
        await ws.send(msg_text('early', '{"x":1}'))
        _, m = await ws_json(ws)
        self.assertEqual((m['op'], m['code']), ('error', 401), m)
        await ws.send('{"op":"ping"}')
        self.assertEqual((await ws_json(ws))[1], {'op': 'pong'})
        self.assertEqual((await ws_auth(ws))['op'], 'auth_ok')
        await ws_echo(ws, '{"after":"auth"}')


class TestEcho(ServerCase):
    @scenario()
    async def test_byte_identical_data(self):
        ws = await ws_client(self.srv.ws_port)
        for i, data in enumerate(DATA_CASES):
            with self.subTest(data=data[:60]):
                await ws_echo(ws, data, cid='c%d' % i)

    @scenario()
    async def test_pipelined_order_and_unique_ids(self):
        ws = await ws_client(self.srv.ws_port)
        for i in range(100):
            await ws.send(msg_text('p%d' % i, '{"i":%d}' % i))
        ids = [await ws_echo(ws, '{"i":%d}' % i, 'p%d' % i, send=False) for i in range(100)]
        self.assertEqual(len(set(ids)), 100, 'message ids are not unique')

    @scenario()
    async def test_message_of_exactly_max_size_is_echoed(self):
        raw = await RawWS.connect(self.srv.ws_port, uid='raw')
        data = '"' + 'x' * (MAX_MESSAGE - len(msg_text('big', '""'))) + '"'
        self.assertEqual(len(msg_text('big', data)), MAX_MESSAGE)
        await raw.echo(data, cid='big')

    @scenario()
    async def test_ping_pong_json_and_ws(self):
        ws = await ws_client(self.srv.ws_port)
        await ws.send('{"op":"ping"}')
        self.assertEqual((await ws_json(ws, 'pong'))[1], {'op': 'pong'})
        await within(await ws.ping(b'\x00lib\xffim'), what='the pong')
        raw = await RawWS.connect(self.srv.ws_port)     # before auth too
        for payload in (b'', b'x', bytes(range(125))):
            raw.send(ws_frame(OP_PING, payload))
            self.assertEqual(await raw.frame(), (True, OP_PONG, payload))

    BAD = ['{', 'not json', '{"op":"msg","cid":"c","data":}', '[1,2]', '""', '{"op":"nope"}',
           '{"op":5}', '{"op":"msg","data":1}', '{"op":"msg","cid":"c"}',
           '{"op":"msg","cid":"c","data":{"a":1}} trailing', '{"op":"msg","cid":"c","data":[1,]}']

    @scenario()
    async def test_error_400_keeps_connection(self):
        ws = await ws_client(self.srv.ws_port)
        for text in self.BAD:
            with self.subTest(text=text):
                await ws.send(text)
                _, m = await ws_json(ws, 'the error')
                self.assertEqual((m.get('op'), m.get('code')), ('error', 400), m)
                await ws_echo(ws, '{"still":"ok"}')


class TestProtocolViolations(ServerCase):
    """Each violation closes only the offender, with its code."""
    PING = b'{"op":"ping"}'
    CASES = [
        ('unmasked text', ws_frame(OP_TEXT, PING, masked=False), 1002),
        ('rsv1', ws_frame(OP_TEXT, PING, rsv=4), 1002),
        ('rsv2', ws_frame(OP_TEXT, PING, rsv=2), 1002),
        ('rsv3', ws_frame(OP_TEXT, PING, rsv=1), 1002),
        ('rsv on ping', ws_frame(OP_PING, b'x', rsv=4), 1002),
        *[('opcode %#x' % op, ws_frame(op, b'x'), 1002) for op in (3, 4, 5, 6, 7, 0xB, 0xF)],
        ('continuation without start', ws_frame(OP_CONT, PING), 1002),
        ('text inside fragmented text', ws_frame(OP_TEXT, b'{', fin=False) + ws_frame(OP_TEXT, PING),
         1002),
        ('fragmented ping', ws_frame(OP_PING, b'x', fin=False), 1002),
        ('ping over 125 bytes', ws_frame(OP_PING, b'x' * 126), 1002),
        ('non-minimal 16-bit length', bytes([0x81, 0xFE, 0, 13]) + b'\0\0\0\0' + PING, 1002),
        ('invalid utf-8 0xff', ws_frame(OP_TEXT, b'"\xff"'), 1007),
        ('overlong utf-8', ws_frame(OP_TEXT, b'"\xc0\xaf"'), 1007),
        ('utf-16 surrogate', ws_frame(OP_TEXT, b'"\xed\xa0\x80"'), 1007),
        ('above U+10FFFF', ws_frame(OP_TEXT, b'"\xf4\x90\x80\x80"'), 1007),
        ('truncated utf-8 at end', ws_frame(OP_TEXT, b'"\xe2\x82'), 1007),
        # declared lengths over --max-message: refused with no payload sent at all
        ('oversize declared, 64-bit', ws_frame(OP_TEXT, length=MAX_MESSAGE + 1), 1009),
        ('huge declared, binary', ws_frame(OP_BIN, length=1 << 62), 1009),
        ('oversize over fragments', ws_frame(OP_TEXT, b' ' * 40000, fin=False)
         + ws_frame(OP_CONT, length=30000), 1009),
        *[('close code %d' % c, ws_frame(OP_CLOSE, close_payload(c)), 1002)
          for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)],
        ('close with 1-byte payload', ws_frame(OP_CLOSE, b'\x03'), 1002),
        ('close reason not utf-8', ws_frame(OP_CLOSE, close_payload(1000, b'\xff')), 1007),
    ]

    @scenario(120)
    async def test_violations_close_only_the_offender(self):
        bystander = await ws_client(self.srv.ws_port, 'bystander')
        for i, (name, data, code) in enumerate(self.CASES):
            with self.subTest(name):
                raw = await RawWS.connect(self.srv.ws_port, uid='offender')
                raw.send(data)
                await raw.expect_close(code)
                await ws_echo(bystander, '{"after":%s}' % json.dumps(name), cid='b%d' % i)

    @scenario()
    async def test_valid_close_is_echoed(self):
        for code in (1000, 1001, 3000, 4999):
            raw = await RawWS.connect(self.srv.ws_port, uid='raw')
            raw.send(ws_frame(OP_CLOSE, close_payload(code, b'bye')))
            await raw.expect_close(code)


class TestFragmentation(ServerCase):
    DATA = '"a\u20acb\U0001F600c\u00e9"'

    def text(self, cid):
        # every cid the same length, so each split point cuts the same field
        return msg_text(cid, self.DATA).encode()

    @scenario()
    async def test_utf8_split_at_every_byte(self):
        raw = await RawWS.connect(self.srv.ws_port, uid='raw')
        for i in range(1, len(self.text('f000'))):
            with self.subTest(split=i):
                b = self.text('f%03d' % i)
                raw.send(ws_frame(OP_TEXT, b[:i], fin=False), ws_frame(OP_CONT, b[i:]))
                await raw.echo(self.DATA, 'f%03d' % i, send=False)
        # one byte per frame, with empty fragments at both ends
        b = self.text('f999')
        frames = [ws_frame(OP_TEXT, b'', fin=False)]
        frames += [ws_frame(OP_CONT, b[i:i + 1], fin=False) for i in range(len(b))]
        raw.send(*frames, ws_frame(OP_CONT, b''))
        await raw.echo(self.DATA, 'f999', send=False)

    HEAD = b'{"op":"msg","cid":"f","data":"'
    BAD_UTF8 = [
        [ws_frame(OP_TEXT, HEAD + b'\xe2\x82', fin=False), ws_frame(OP_CONT, b'("}')],
        [ws_frame(OP_TEXT, HEAD + b'\xf0', fin=False), ws_frame(OP_CONT, b'\x9f', fin=False),
         ws_frame(OP_CONT, b'\x98"}')],
        [ws_frame(OP_TEXT, HEAD + b'\xe2', fin=False), ws_frame(OP_CONT, b'\x82')],
        # fail fast: the bad first fragment is refused before any continuation
        [ws_frame(OP_TEXT, HEAD + b'\xff', fin=False)],
    ]

    @scenario()
    async def test_invalid_utf8_across_fragments_1007(self):
        for i, frames in enumerate(self.BAD_UTF8):
            with self.subTest(case=i):
                raw = await RawWS.connect(self.srv.ws_port, uid='raw')
                raw.send(*frames)
                await raw.expect_close(1007)

    @scenario()
    async def test_fragmented_message_with_interleaved_ping(self):
        raw = await RawWS.connect(self.srv.ws_port, uid='raw')
        b = self.text('f000')
        raw.send(ws_frame(OP_TEXT, b[:10], fin=False), ws_frame(OP_PING, b'mid'),
                 ws_frame(OP_CONT, b[10:20], fin=False), ws_frame(OP_PONG, b'unsolicited'),
                 ws_frame(OP_CONT, b[20:]))
        self.assertEqual(await raw.frame(), (True, OP_PONG, b'mid'))
        await raw.echo(self.DATA, 'f000', send=False)
        await raw.echo('{"next":"message"}')

    @scenario()
    async def test_message_of_empty_fragments_is_error_400(self):
        raw = await RawWS.connect(self.srv.ws_port, uid='raw')
        raw.send(ws_frame(OP_TEXT, b'', fin=False), ws_frame(OP_CONT, b'', fin=False),
                 ws_frame(OP_CONT, b''))
        _, m = await raw.json('the error')
        self.assertEqual((m.get('op'), m.get('code')), ('error', 400), m)
        await raw.echo('{"next":"message"}')


class TestHandshake(ServerCase):
    KEY = base64.b64encode(b'0123456789abcdef').decode()

    def reject(self, **kw):
        port = self.srv.ws_port
        return run(http_reject(port, upgrade_request(port, key=kw.pop('key', self.KEY), **kw)))

    def test_version_426(self):
        for version in ('12', '8', None):
            with self.subTest(version=version):
                status, headers, _ = self.reject(version=version)
                self.assertEqual(status, 426)
                self.assertEqual(headers.get('sec-websocket-version'), '13')

    def test_missing_upgrade_or_key_400(self):
        for kw in ({'upgrade': None}, {'connection': None}, {'key': None}, {'key': 'short'}):
            with self.subTest(**kw):
                self.assertEqual(self.reject(**kw)[0], 400)

    def test_wrong_path_404(self):
        for path in ('/', '/nope', '/ws/x', '/WS'):
            with self.subTest(path=path):
                self.assertEqual(self.reject(path=path)[0], 404)

    @scenario()
    async def test_subprotocol_selection(self):
        for offer, chosen in (('imp.bin', 'imp.bin'), ('foo, imp.json', 'imp.json'),
                              (None, None)):
            raw = await RawWS.connect(self.srv.ws_port, protocol=offer)
            self.assertEqual(raw.headers.get('sec-websocket-protocol'), chosen, offer)


class TestBinarySubprotocol(ServerCase):
    async def recv_bin(self, ws, what):
        m = await within(ws.recv(), what=what)
        check(isinstance(m, bytes), 'expected a binary %s, got %r' % (what, m[:80]))
        return parse_imp_bin(m)

    @scenario()
    async def test_imp_bin_over_websocket(self):
        ws = await ws_connect(self.srv.ws_port, protocol='imp.bin')
        self.assertEqual(ws.subprotocol, 'imp.bin')
        await ws.send(imp_bin('msg', cid='early', data='1'))
        op, f = await self.recv_bin(ws, 'error')
        self.assertEqual((op, be(f['code'])), ('error', 401))
        await ws.send(imp_bin('auth', uid='binny', token='t', device='d', platform='web'))
        op, f = await self.recv_bin(ws, 'auth_ok')
        self.assertEqual(op, 'auth_ok')
        self.assertTrue(f['conn'])
        self.assertEqual(be(f['hb']), 30)
        for i, data in enumerate(DATA_CASES):
            await ws.send(imp_bin('msg', cid='b%d' % i, data=data))
            aop, ack = await self.recv_bin(ws, 'ack')
            mop, msg = await self.recv_bin(ws, 'echo')
            self.assertEqual((aop, mop), ('ack', 'msg'))
            check_bin_echo(ack, msg, 'b%d' % i, data)
        await ws.send(imp_bin('ping'))
        self.assertEqual((await self.recv_bin(ws, 'pong'))[0], 'pong')
        for bad in (b'\x7f', b'\x03\x07\x05ab', b'\x03\x07\x01c\x0f\x03{x}'):
            await ws.send(bad)
            op, f = await self.recv_bin(ws, 'error')
            self.assertEqual((op, be(f['code'])), ('error', 400), bad)
        await ws.send(imp_bin('msg', cid='last', data='{"still":"ok"}'))
        check_bin_echo((await self.recv_bin(ws, 'ack'))[1],
                       (await self.recv_bin(ws, 'echo'))[1], 'last', '{"still":"ok"}')


class TestTCP(ServerCase):
    @scenario()
    async def test_auth_and_echo(self):
        c = await TCPClient.connect(self.srv.tcp_port)
        f = await c.auth()
        self.assertTrue(f['conn'])
        self.assertEqual(be(f['hb']), 30)
        for i, data in enumerate(DATA_CASES):
            await c.echo(data, cid='t%d' % i)
        c.send('ping')
        await c.expect('pong')

    @scenario()
    async def test_msg_before_auth_and_bad_token(self):
        c = await TCPClient.connect(self.srv.tcp_port)
        c.send('msg', cid='x', data='1')
        self.assertEqual(be((await c.expect('error'))['code']), 401)
        await c.auth()
        await c.echo('{"ok":true}')
        c = await TCPClient.connect(self.srv.tcp_port)
        c.send('auth', uid='tcp', token='')
        self.assertEqual(be((await c.expect('error'))['code']), 401)
        await c.expect_error_close(4401)

    @scenario()
    async def test_pipelined_frames_in_one_send(self):
        c = await TCPClient.connect(self.srv.tcp_port)
        blob = tcp_frame(imp_bin('auth', uid='pipe', token='t'))
        blob += b''.join(tcp_frame(imp_bin('msg', cid='p%d' % i, data='[%d]' % i))
                         for i in range(50))
        c.w.write(blob + tcp_frame(imp_bin('ping')))
        await c.expect('auth_ok')
        for i in range(50):
            check_bin_echo(await c.expect('ack'), await c.expect('msg'), 'p%d' % i, '[%d]' % i)
        await c.expect('pong')

    @scenario()
    async def test_frames_split_byte_by_byte(self):
        c = await TCPClient.connect(self.srv.tcp_port)
        data = '{"split":"\u00e9\U0001F600"}'
        blob = tcp_frame(imp_bin('auth', uid='bytes', token='t'))
        blob += tcp_frame(imp_bin('msg', cid='s', data=data))
        for byte in blob:
            c.w.write(bytes([byte]))
            await c.w.drain()
            await asyncio.sleep(0.001)      # pacing so the bytes arrive apart
        await c.expect('auth_ok')
        check_bin_echo(await c.expect('ack'), await c.expect('msg'), 's', data)

    @scenario()
    async def test_bad_packet_keeps_connection(self):
        c = await TCPClient.connect(self.srv.tcp_port, uid='tcp')
        for bad in (b'\x7f', b'\x03\x07\x05ab', b'\x03\x07\x01c\x0f\x03{x}', b'\x03\x0f\x011'):
            c.w.write(tcp_frame(bad))
            self.assertEqual(be((await c.expect('error'))['code']), 400, bad)
        await c.echo('"fine"')

    @scenario()
    async def test_frame_of_exactly_max_size_is_echoed(self):
        c = await TCPClient.connect(self.srv.tcp_port, uid='tcp')
        n = MAX_MESSAGE - len(imp_bin('msg', cid='big', data='"%s"' % ('y' * 70000))) + 70000
        data = '"' + 'y' * n + '"'
        self.assertEqual(len(imp_bin('msg', cid='big', data=data)), MAX_MESSAGE)
        await c.echo(data, cid='big')

    @scenario()
    async def test_oversize_frame_1009(self):
        bystander = await TCPClient.connect(self.srv.tcp_port, uid='bystander')
        c = await TCPClient.connect(self.srv.tcp_port, uid='tcp')
        # only the length prefix and the op byte: refused before the body
        c.w.write(struct.pack('!I', MAX_MESSAGE + 1) + b'\x03')
        await c.expect_error_close(1009)
        await bystander.echo('{"still":"here"}')


class TestTimeouts(ServerCase):
    server_args = ('--auth-timeout', '500', '--heartbeat', '1', '--idle-timeout', '800')

    def assert_elapsed(self, t0, lo, hi=4.0):
        # the server's timers run on 100 ms ticks: allow one tick early
        dt = time.monotonic() - t0
        self.assertTrue(lo <= dt <= hi, 'closed after %.2fs, expected %.1f..%.1f' % (dt, lo, hi))

    @scenario()
    async def test_ws_auth_timeout_4408(self):
        t0 = time.monotonic()
        ws = await ws_connect(self.srv.ws_port)
        self.assertEqual(await ws_close_code(ws), 4408)
        self.assert_elapsed(t0, 0.35)

    @scenario()
    async def test_tcp_auth_timeout_4408(self):
        t0 = time.monotonic()
        c = await TCPClient.connect(self.srv.tcp_port)
        await c.expect_error_close(4408)
        self.assert_elapsed(t0, 0.35)

    @scenario()
    async def test_handshake_timeout_drops_socket(self):
        t0 = time.monotonic()
        r, w = await open_tcp(self.srv.ws_port)
        w.write(b'GET /ws HTTP/1.1\r\n')
        self.assertEqual(await read_to_eof(r), b'')
        self.assert_elapsed(t0, 0.35)

    @scenario()
    async def test_idle_timeout_4408(self):
        ws = await ws_connect(self.srv.ws_port)
        m = await ws_auth(ws)
        t0 = time.monotonic()
        self.assertEqual(m['hb'], 1)
        self.assertEqual(await ws_close_code(ws), 4408)
        self.assert_elapsed(t0, 0.65)
        c = await TCPClient.connect(self.srv.tcp_port)
        self.assertEqual(be((await c.auth())['hb']), 1)
        t0 = time.monotonic()
        await c.expect_error_close(4408)
        self.assert_elapsed(t0, 0.65)

    @scenario()
    async def test_traffic_keeps_connection_alive(self):
        ws = await ws_client(self.srv.ws_port)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:        # well past the 0.8 s idle limit
            await asyncio.sleep(0.3)              # pacing, not waiting for a result
            await ws.send('{"op":"ping"}')
            self.assertEqual((await ws_json(ws, 'pong'))[1], {'op': 'pong'})
        self.assertEqual(await ws_close_code(ws), 4408)


class TestShutdown(unittest.TestCase):
    """A server of its own per test; SIGTERM is the thing under test."""

    def setUp(self):
        self.srv = EchoServer()
        self.addCleanup(self.srv.kill)

    @scenario()
    async def test_sigterm_closes_everyone_with_1001(self):
        srv = self.srv
        authed = [await ws_client(srv.ws_port, 'u%d' % i) for i in range(3)]
        unauthed = await ws_connect(srv.ws_port)
        raw = await RawWS.connect(srv.ws_port, uid='raw')
        tcp = await TCPClient.connect(srv.tcp_port, uid='tcp')
        r, half = await open_tcp(srv.ws_port)
        half.write(b'GET /ws HTTP/1.1\r\nHost: x\r\n')      # mid-handshake
        await ws_echo(authed[0], '"before"')
        srv.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(ws_close_code(w) for w in authed + [unauthed]))
        self.assertEqual(codes, [1001] * 4)
        await raw.expect_close(1001, reply=True)
        await tcp.expect_error_close(1001)
        self.assertEqual(await read_to_eof(r), b'')
        # one SIGTERM only: a second one may land after the handlers are gone
        stop = functools.partial(srv.stop, signal_it=False)
        assert_clean_exit(*(await asyncio.get_running_loop().run_in_executor(None, stop)))

    def test_sigterm_right_after_ready_line(self):
        # a supervisor may signal as soon as the "listening" lines appear; the
        # window is short, so try a few fresh servers
        for attempt in range(10):
            srv = self.srv if attempt == 0 else EchoServer()
            self.addCleanup(srv.kill)
            rc, log = srv.stop()
            check(rc == 0, 'start #%d: exit status %r after SIGTERM right after the ready '
                  'line, expected 0\n%s' % (attempt + 1, rc, log))


class TestLoad(ServerCase):
    CLIENTS, MSGS = 200, 20

    async def client(self, i):
        ws = await ws_client(self.srv.ws_port, 'load%d' % i)
        datas = ['{"client":%d,"n":%d,"pad":"%s"}' % (i, j, '\u00e9' * j) for j in range(self.MSGS)]
        for j, d in enumerate(datas):
            await ws.send(msg_text('c%d-%d' % (i, j), d))
        for j, d in enumerate(datas):
            await ws_echo(ws, d, 'c%d-%d' % (i, j), send=False)
        await within(ws.close(), what='the close handshake')

    @scenario(180)
    async def test_many_clients_get_their_own_data(self):
        await asyncio.gather(*(self.client(i) for i in range(self.CLIENTS)))


class TestSlowReader(ServerCase):
    """A client that sends but never reads is shed; the others carry on.

    262144 rather than 64 KiB: im-echo flushes once per loop iteration, so one
    64 KiB read of pipelined msgs can queue > 64 KiB of acks+echoes even for a
    client that reads promptly; a 256 KiB bound is only reached by a backlog."""
    server_args = ('--max-output', '262144')
    COUNT, PAD = 12000, 1000            # ~13 MB of echoes: more than any socket buffer

    async def shed(self, writer, unit, read_one):
        """Send COUNT msgs (unit(cid) frames) without reading, then read what
        is left of the stream: it must end (close code 4429, or EOF/reset)
        before COUNT echoes."""
        try:
            for i in range(self.COUNT // 100):
                writer.write(b''.join(unit('s%d' % (i * 100 + j)) for j in range(100)))
                await within(writer.drain(), 30, 'the server to read our msgs')
        except ConnectionError:
            pass                        # shed and reset while we were still sending
        echoes, code = 0, None
        try:
            while code is None:
                kind, code = await read_one(15)
                echoes += kind == 'msg'
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                        # closed (or reset) without a final close code
        except Timeout:
            raise AssertionError('slow reader never shed: %d echoes of %d' % (echoes, self.COUNT))
        self.assertLess(echoes, self.COUNT)
        self.assertIn(code, (None, 4429))

    @scenario(120)
    async def test_ws_slow_reader_shed(self):
        bystander = await ws_client(self.srv.ws_port, 'bystander')
        raw = await RawWS.connect(self.srv.ws_port, rcvbuf=4096, uid='slow')

        async def read_one(timeout):
            fin, op, p = await raw.frame(timeout)
            if op == OP_CLOSE:
                return 'close', close_code(p)
            return ('msg' if p.startswith(b'{"op":"msg"') else 'other'), None
        await self.shed(raw.w, lambda cid: ws_frame(OP_TEXT, msg_text(cid, '"%s"' % ('x' * self.PAD)).encode()),
                        read_one)
        await ws_echo(bystander, '{"after":"shed"}')

    @scenario(120)
    async def test_tcp_slow_reader_shed(self):
        bystander = await TCPClient.connect(self.srv.tcp_port, uid='bystander')
        c = await TCPClient.connect(self.srv.tcp_port, rcvbuf=4096, uid='slow')

        async def read_one(timeout):
            op, f = await c.packet(timeout)
            return op, be(f['code']) if op == 'error' else None
        await self.shed(c.w, lambda cid: tcp_frame(imp_bin('msg', cid=cid, data='"%s"' % ('x' * self.PAD))),
                        read_one)
        await bystander.echo('{"after":"shed"}')


def main():
    global IM_ECHO
    argv = list(sys.argv)
    if '--im-echo' in argv:
        i = argv.index('--im-echo')
        IM_ECHO = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i:i + 2]
    IM_ECHO = IM_ECHO or os.environ.get('IM_ECHO')
    if not IM_ECHO or not os.access(IM_ECHO, os.X_OK):
        sys.exit('test_echo.py: set IM_ECHO or pass --im-echo PATH (got %r)' % IM_ECHO)
    unittest.main(argv=argv, verbosity=2)


if __name__ == '__main__':
    main()
