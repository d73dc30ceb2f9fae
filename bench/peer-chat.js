// The chat benchmark peer: what imd does for 1:1 chat and HTTP push, written
// on Node's `ws` (Debian package node-ws) and `http`, in one process and one
// event loop like imd, with the same JSON shapes (daemon/chat.c, daemon/api.c).
// Any token is accepted (imd checks an HMAC); nothing is stored.
//   node bench/peer-chat.js [WS_PORT] [HTTP_PORT] [API_KEY]
// Prints "peer-chat: ws listening on 127.0.0.1 port N" and the same for http.
'use strict';
const http = require('http');
let ws;
try { ws = require('ws'); } catch (e) { ws = require('/usr/share/nodejs/ws'); }

const wsPort = Number(process.argv[2] || 0);
const httpPort = Number(process.argv[3] || 0);
const apiKey = process.argv[4] || process.env.PEER_API_KEY || 'bench';
const users = new Map(); // uid -> Set of authenticated sockets
let nextConn = 1;
let nextId = 1;

function login(sock, uid) {
  sock.uid = uid;
  let set = users.get(uid);
  if (!set) users.set(uid, (set = new Set()));
  set.add(sock);
  sock.send(JSON.stringify({ op: 'auth_ok', conn: (nextConn++).toString(16), hb: 30 }));
}

function error(sock, code, reason, cid) {
  const e = { op: 'error', code, reason };
  if (cid !== undefined) e.cid = cid;
  sock.send(JSON.stringify(e));
}

// One encoding for every copy, as imd does. Returns the copies queued.
function deliver(uids, m, except) {
  const text = JSON.stringify(m);
  let n = 0;
  for (const uid of uids) {
    const set = users.get(uid);
    if (!set) continue;
    for (const s of set) {
      if (s === except) continue;
      s.send(text);
      n++;
    }
  }
  return n;
}

const wss = new ws.WebSocketServer({
  port: wsPort, host: '127.0.0.1', path: '/ws', perMessageDeflate: false,
  handleProtocols: (protocols) => (protocols.has('imp.json') ? 'imp.json' : false),
});
wss.on('listening', () => console.log(`peer-chat: ws listening on 127.0.0.1 port ${wss.address().port}`));
wss.on('connection', (sock, req) => {
  const q = new URL(req.url, 'http://x').searchParams;
  if (q.get('uid') && q.get('token')) login(sock, q.get('uid'));
  sock.on('close', () => {
    const set = sock.uid && users.get(sock.uid);
    if (set) {
      set.delete(sock);
      if (set.size === 0) users.delete(sock.uid);
    }
  });
  sock.on('message', (raw) => {
    let m;
    try { m = JSON.parse(raw); } catch (e) { error(sock, 400, 'malformed message'); return; }
    if (m === null || typeof m !== 'object') { error(sock, 400, 'malformed message'); return; }
    switch (m.op) {
      case 'ping': sock.send('{"op":"pong"}'); return;
      case 'auth':
        if (sock.uid) { error(sock, 409, 'already authenticated', m.cid); return; }
        if (typeof m.uid !== 'string' || !m.uid) { error(sock, 401, 'missing uid'); sock.close(4401); return; }
        login(sock, m.uid);
        return;
    }
    if (!sock.uid) { error(sock, 401, 'authenticate first', m.cid); return; }
    if (m.op === 'ack') return; // a receiver's ack: nothing is kept to retransmit
    if (m.op !== 'msg') { error(sock, 400, 'missing or unknown op', m.cid); return; }
    if (typeof m.cid !== 'string') { error(sock, 400, 'missing cid'); return; }
    if (m.data === undefined) { error(sock, 400, 'missing data', m.cid); return; }
    if (typeof m.to !== 'string' || !m.to) { error(sock, 400, 'missing to', m.cid); return; }
    const id = String(nextId++);
    // the receiver's devices, then the sender's other devices
    deliver(m.to === sock.uid ? [m.to] : [m.to, sock.uid],
            { op: 'msg', id, from: sock.uid, to: m.to, ts: Date.now(), data: m.data }, sock);
    sock.send(JSON.stringify({ op: 'ack', cid: m.cid, id }));
  });
});

function reply(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (req.headers.authorization !== `Bearer ${apiKey}`) { reply(res, 401, { error: 'missing or bad API key' }); return; }
    if (req.url !== '/v1/messages') { reply(res, 404, { error: 'no such route' }); return; }
    if (req.method !== 'POST') { reply(res, 405, { error: 'method not allowed' }); return; }
    let b;
    try { b = JSON.parse(Buffer.concat(chunks)); } catch (e) { b = null; }
    if (b === null || typeof b !== 'object' || Array.isArray(b)) { reply(res, 400, { error: 'body must be a JSON object' }); return; }
    if (b.data === undefined) { reply(res, 400, { error: 'missing data' }); return; }
    if (b.from !== undefined && typeof b.from !== 'string') { reply(res, 400, { error: 'from must be a string' }); return; }
    const to = typeof b.to === 'string' ? [b.to] : b.to;
    if (!Array.isArray(to) || to.length === 0 || !to.every((u) => typeof u === 'string' && u)) {
      reply(res, 400, { error: 'to must be a non-empty uid or array of uids' });
      return;
    }
    const id = String(nextId++);
    const m = { op: 'msg', id, from: b.from || 'system', ts: Date.now(), data: b.data };
    if (to.length === 1) m.to = to[0];
    reply(res, 200, { id, delivered: deliver(to, m, null) });
  });
});
server.listen(httpPort, '127.0.0.1', () =>
  console.log(`peer-chat: http listening on 127.0.0.1 port ${server.address().port}`));
process.on('SIGTERM', () => process.exit(0));
