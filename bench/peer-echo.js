// The benchmark peer: the same IMP JSON echo service as im-echo, written on
// Node's `ws` (Debian package node-ws), so both are measured by one client
// in one run. Only the JSON subprotocol and the ops the bench uses.
//   node bench/peer-echo.js PORT
'use strict';
const path = require('path');
let ws;
try { ws = require('ws'); } catch (e) { ws = require('/usr/share/nodejs/ws'); }
const port = Number(process.argv[2] || 0);
let nextId = 1;
const wss = new ws.WebSocketServer({ port, host: '127.0.0.1', path: '/ws', perMessageDeflate: false });
wss.on('listening', () => console.log(`peer-echo: ws listening on 127.0.0.1 port ${wss.address().port}`));
wss.on('connection', (sock, req) => {
  const q = new URL(req.url, 'http://x').searchParams;
  let authed = false;
  if (q.get('uid') && q.get('token')) {
    authed = true;
    sock.send(JSON.stringify({ op: 'auth_ok', conn: String(nextId++), hb: 30 }));
  }
  sock.on('message', (raw) => {
    let m;
    try { m = JSON.parse(raw); } catch (e) { sock.send('{"op":"error","code":400}'); return; }
    if (m.op === 'ping') { sock.send('{"op":"pong"}'); return; }
    if (m.op === 'auth') {
      authed = !!(m.uid && m.token);
      sock.send(authed ? JSON.stringify({ op: 'auth_ok', conn: String(nextId++), hb: 30 })
                       : '{"op":"error","code":401}');
      return;
    }
    if (!authed) { sock.send('{"op":"error","code":401}'); return; }
    if (m.op === 'msg') {
      const id = String(nextId++);
      sock.send(JSON.stringify({ op: 'ack', cid: m.cid, id }));
      sock.send(JSON.stringify({ op: 'msg', id, data: m.data }));
    }
  });
});
process.on('SIGTERM', () => process.exit(0));
