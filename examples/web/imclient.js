// imclient.js: an IMP client for browsers (WebSocket, imp.json), with the
// behaviour of libim's C client (docs/CLIENT.md, lib/client/):
//
//  - auth {uid, token, device, platform, since: contiguous}: the missed
//    messages come in the same round trip, then sync pages (sync_end.more).
//  - Stored messages (those with a seq) are handed to onmessage exactly once
//    and in seq order: seq <= contiguous is a duplicate (ACKed again, not
//    shown); a jump past contiguous + 1 is neither shown nor ACKed, and a sync
//    from contiguous brings it in order. Every message handled is ACKed with
//    {id, seq}. Messages without seq (rooms) are de-duplicated by id.
//  - The ack of one of our own messages carries its seq in our inbox: it
//    counts as received (the sending connection gets no copy).
//  - An ordered outbox: send() queues, every message is (re)sent with the
//    same cid after each auth_ok until its ack; a 5xx error resends it after
//    1 s, a 4xx drops it (onerror tells). imd de-duplicates by (uid, device,
//    cid), so a resend is never stored twice.
//  - Reconnects with exponential backoff and full jitter: the delay before
//    attempt n is uniform in [0, min(cap, base * 2^n)]; n is reset once a
//    connection stayed authenticated for connectTimeoutMs.
//  - Heartbeat: a ping op when nothing was sent or nothing received for hb
//    seconds (auth_ok.hb); nothing received for hb + pongTimeoutMs closes
//    the socket and reconnects.
//  - goaway {reconnect_ms}: keep the connection until reconnect_ms has
//    passed (or the server closes it), then connect to the next URL of the
//    list without a backoff delay.
//  - 401/4401 (refused credentials) stops the client: the same token would
//    only be refused again.
//
// No framework, no build step: an ES module. State worth keeping across a
// page reload (contiguous, the outbox) is exposed for the page to persist
// and passed back in the options.
//
// Limits: seq and ts are read with JSON.parse, so they are exact up to
// 2^53 (ids are strings and always exact).

const ST = Object.freeze({
  IDLE: 'idle', WAITING: 'waiting', CONNECTING: 'connecting', AUTHENTICATING: 'authenticating',
  SYNCING: 'syncing', OPEN: 'open', STOPPED: 'stopped',
});
export const STATES = ST;

function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');
}

export class ImClient {
  // opts: urls (array of ws:// URLs, required), uid, token (required),
  // device (default: random), platform ('web'), since (0), outbox (array of
  // {cid, to|group|room, data} still unacknowledged from a previous page),
  // backoffBaseMs (500), backoffCapMs (30000), connectTimeoutMs (10000),
  // pongTimeoutMs (10000), pingMs (0: auth_ok's hb), dedupeWindow (1024),
  // outboxMax (1024).
  constructor(opts) {
    if (!opts || !opts.urls || !opts.urls.length || !opts.uid || !opts.token)
      throw new Error('ImClient: urls, uid and token are required');
    this.urls = opts.urls.slice();
    this.uid = opts.uid;
    this.token = opts.token;
    this.device = opts.device || 'web-' + randomHex(4);
    this.platform = opts.platform || 'web';
    this.backoffBaseMs = opts.backoffBaseMs ?? 500;
    this.backoffCapMs = opts.backoffCapMs ?? 30000;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 10000;
    this.pongTimeoutMs = opts.pongTimeoutMs ?? 10000;
    this.pingMs = opts.pingMs ?? 0;
    this.dedupeWindow = opts.dedupeWindow ?? 1024;
    this.outboxMax = opts.outboxMax ?? 1024;
    this.contiguous = opts.since ?? 0;
    this.outbox = (opts.outbox || []).map((e) => ({ ...e, sent: false, retryAt: 0 }));
    this.cidPrefix = randomHex(8);
    this.cidCounter = 0;
    this.state = ST.IDLE;
    this.urlIndex = 0;
    this.attempt = 0;
    this.ws = null;
    this.gen = 0;           // bumps on every new socket: stale events are ignored
    this.own = [];          // own seqs (from acks) above contiguous
    this.ids = new Set();   // recent ids (messages without seq), oldest first
    this.sync = null;       // {since, firstJump, msgs} while a sync runs
    this.jumpSeen = 0;
    this.syncPages = 0;     // sync answers received (auth {since} and sync), for tests and logs
    this.goaways = 0;       // goaway ops received
    this.pongs = 0;         // pong ops received (answers to our heartbeat pings)
    this.connections = 0;   // connections that reached auth_ok
    this.timers = {};
    this.lastSent = 0;
    this.lastRecv = 0;
    this.authedAt = 0;
    this.goawayAt = 0;
    // callbacks, all optional
    this.onmessage = null;  // (m: {id, from, to, group, room, ts, seq, data}) once per message
    this.onack = null;      // ({cid, id, seq}) an outbox message is stored
    this.onerror = null;    // ({code, reason, cid}) an error op
    this.onstate = null;    // (state, detail) every state change
    this.onchange = null;   // () contiguous or the outbox changed: persist them
  }

  // ---- public ----------------------------------------------------------

  start() {
    if (this.state !== ST.IDLE && this.state !== ST.STOPPED) return;
    this._connect();
  }

  stop() {
    this._clearTimers();
    this.gen++;
    if (this.ws) {
      try { this.ws.close(1000); } catch (e) { /* already closed */ }
      this.ws = null;
    }
    this._setState(ST.STOPPED);
  }

  // Queues a message: target {to}, {group} or {room}, data any JSON value.
  // Returns its cid (the key onack reports), or throws when the outbox is
  // full.
  send(target, data) {
    if (this.outbox.length >= this.outboxMax) throw new Error('outbox full');
    const cid = `${this.cidPrefix}-${++this.cidCounter}`;
    return this.sendWithCid(cid, target, data);
  }

  // As send() with the caller's cid (it must be unique for this uid and
  // device: imd keeps cids as idempotency keys; a repeat of a stored cid
  // is acknowledged with the first message's id and not stored again).
  sendWithCid(cid, target, data) {
    if (this.outbox.some((e) => e.cid === cid)) return cid;
    const e = { cid, data, sent: false, retryAt: 0 };
    if (target.to) e.to = target.to;
    else if (target.group) e.group = target.group;
    else if (target.room) e.room = target.room;
    else throw new Error('send: give to, group or room');
    this.outbox.push(e);
    this._changed();
    this._flushOutbox();
    return cid;
  }

  // The outbox as plain data, to persist (pass it back as opts.outbox).
  pendingMessages() {
    return this.outbox.map(({ cid, to, group, room, data }) => ({ cid, to, group, room, data }));
  }

  // ---- connection --------------------------------------------------------

  _setState(s, detail) {
    this.state = s;
    if (this.onstate) this.onstate(s, detail);
  }

  _changed() { if (this.onchange) this.onchange(); }

  _clearTimers() {
    for (const k of Object.keys(this.timers)) clearTimeout(this.timers[k]);
    this.timers = {};
  }

  _timer(name, ms, fn) {
    clearTimeout(this.timers[name]);
    this.timers[name] = setTimeout(() => { delete this.timers[name]; fn(); }, ms);
  }

  _connect() {
    this._clearTimers();
    const gen = ++this.gen;
    const url = this.urls[this.urlIndex % this.urls.length];
    this._setState(ST.CONNECTING, url);
    let ws;
    try {
      ws = new WebSocket(url, 'imp.json');
    } catch (e) {
      this._lost(gen, 0, String(e));
      return;
    }
    this.ws = ws;
    this.sync = null;
    this.jumpSeen = 0;
    this.authedAt = 0;
    this.goawayAt = 0;
    this._timer('connect', this.connectTimeoutMs, () => this._drop(gen, 'connect timeout'));
    ws.onopen = () => {
      if (gen !== this.gen) return;
      this._setState(ST.AUTHENTICATING);
      this._send({ op: 'auth', uid: this.uid, token: this.token, device: this.device,
                   platform: this.platform, since: this.contiguous });
      this.sync = { since: this.contiguous, firstJump: 0, msgs: false };
    };
    ws.onmessage = (ev) => {
      if (gen !== this.gen) return;
      this.lastRecv = Date.now();
      let p;
      try { p = JSON.parse(ev.data); } catch (e) { this._drop(gen, 'bad JSON from server'); return; }
      this._packet(p);
    };
    ws.onclose = (ev) => this._lost(gen, ev.code, ev.reason);
    ws.onerror = () => { /* onclose follows */ };
  }

  // Close the socket ourselves (timeout, goaway) and go on as after a loss.
  _drop(gen, why, code = 4000) {
    if (gen !== this.gen) return;
    try { this.ws.close(code === 1001 ? 1000 : code, why.slice(0, 100)); } catch (e) { /* closed */ }
    this._lost(gen, 0, why);
  }

  _lost(gen, code, reason) {
    if (gen !== this.gen) return;
    this.gen++; // later events of that socket are stale
    this.ws = null;
    this._clearTimers();
    for (const e of this.outbox) e.sent = false;
    if (code === 4401) { // credentials refused: retrying cannot help
      this._setState(ST.STOPPED, `refused: ${reason}`);
      return;
    }
    // n counts the attempts since a connection stayed up connectTimeoutMs
    if (this.authedAt && Date.now() - this.authedAt >= this.connectTimeoutMs) this.attempt = 0;
    // failed before auth_ok, or told to go: the next gateway of the list
    if (!this.authedAt || this.goawayAt) this.urlIndex++;
    let delay;
    if (this.goawayAt && this.attempt === 0) {
      delay = 0; // goaway: straight on, no backoff ...
    } else { // ... unless the last connections were short (one draining node: no hot loop)
      const ceil = Math.min(this.backoffCapMs, this.backoffBaseMs * 2 ** Math.min(this.attempt, 30));
      delay = Math.floor(Math.random() * (ceil + 1)); // full jitter
    }
    this.attempt++;
    this._setState(ST.WAITING, { code, reason, delay });
    this._timer('reconnect', delay, () => this._connect());
  }

  _send(p) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(p));
    this.lastSent = Date.now();
    return true;
  }

  _heartbeat() {
    const gen = this.gen;
    const hb = this.hbMs;
    const now = Date.now();
    if (now - this.lastRecv >= hb + this.pongTimeoutMs) {
      this._drop(gen, 'read timeout');
      return;
    }
    if (now - this.lastSent >= hb || now - this.lastRecv >= hb) this._send({ op: 'ping' });
    this._timer('hb', Math.max(100, Math.min(hb, this.pongTimeoutMs) / 2), () => this._heartbeat());
  }

  // ---- packets -----------------------------------------------------------

  _packet(p) {
    switch (p.op) {
      case 'auth_ok': return this._authOk(p);
      case 'msg': return this._msg(p);
      case 'ack': return this._ack(p);
      case 'sync_end': return this._syncEnd(p);
      case 'error': return this._error(p);
      case 'goaway': return this._goaway(p);
      case 'pong': this.pongs++; return undefined;
      default: return undefined; // later versions may add ops
    }
  }

  _authOk(p) {
    clearTimeout(this.timers.connect);
    this.authedAt = Date.now();
    this.connections++;
    this.hbMs = this.pingMs || Math.min(Number(p.hb || 30), 3600) * 1000;
    this.lastRecv = Date.now();
    this._setState(ST.SYNCING, p.conn);
    this._heartbeat();
    for (const e of this.outbox) e.sent = false; // resend all, same cids, in order
    this._flushOutbox();
  }

  _flushOutbox() {
    if (!this.authedAt || !this.ws) return;
    const now = Date.now();
    let wait = Infinity;
    for (const e of this.outbox) {
      if (e.sent) continue;
      if (e.retryAt > now) { wait = Math.min(wait, e.retryAt - now); continue; }
      const p = { op: 'msg', cid: e.cid, data: e.data };
      if (e.to) p.to = e.to; else if (e.group) p.group = e.group; else p.room = e.room;
      if (this._send(p)) e.sent = true;
    }
    if (wait !== Infinity) this._timer('retry', wait, () => this._flushOutbox());
  }

  _startSync(since) {
    if (this.sync) return;
    this.sync = { since, firstJump: 0, msgs: false };
    this._send({ op: 'sync', since });
  }

  _absorbOwn() {
    let moved = true;
    while (moved) {
      moved = false;
      this.own = this.own.filter((s) => {
        if (s > this.contiguous + 1) return true;
        if (s === this.contiguous + 1) { this.contiguous++; moved = true; }
        return false;
      });
    }
  }

  _rememberId(id) {
    this.ids.add(id);
    if (this.ids.size > this.dedupeWindow) this.ids.delete(this.ids.values().next().value);
  }

  _msg(p) {
    const id = p.id || '';
    const seq = typeof p.seq === 'number' ? p.seq : 0;
    if (this.sync) this.sync.msgs = true;
    if (seq) {
      if (seq <= this.contiguous) { // duplicate: ACK again, show nothing
        this._send({ op: 'ack', id, seq });
        return;
      }
      if (seq !== this.contiguous + 1) { // jump: the sync brings it in order
        if (this.sync && !this.sync.firstJump) this.sync.firstJump = seq;
        this.jumpSeen = Math.max(this.jumpSeen, seq);
        this._startSync(this.contiguous);
        return;
      }
      this.contiguous = seq;
    }
    const dup = id && this.ids.has(id);
    if (!dup) {
      if (id) this._rememberId(id);
      if (this.onmessage) {
        try {
          this.onmessage({ id, from: p.from, to: p.to, group: p.group, room: p.room, ts: p.ts,
                           seq, data: p.data });
        } catch (e) { console.error('onmessage', e); }
      }
    }
    if (seq) { this._absorbOwn(); this._changed(); }
    this._send(seq ? { op: 'ack', id, seq } : { op: 'ack', id });
  }

  _syncEnd(p) {
    const s = this.sync;
    if (!s) return;
    this.sync = null;
    this.syncPages++;
    const last = typeof p.last === 'number' ? p.last : s.since;
    let resync = false;
    if (p.gap) { // retention removed what lies below: it will not come
      if (s.firstJump) {
        this.contiguous = Math.max(this.contiguous, s.firstJump - 1);
        resync = true;
      } else if (!s.msgs && last > this.contiguous) {
        this.contiguous = last;
      }
      this._absorbOwn();
    }
    if (last < s.since) { // the server's inbox ends before our position
      this.contiguous = last;
      this.own = [];
    }
    let from = this.contiguous;
    if (p.more) {
      resync = true;
      if (from <= s.since && last > s.since) from = last;
    } else if (this.jumpSeen > this.contiguous) {
      resync = true; // a live message came past the answer's end
    }
    this._changed();
    if (resync) { this._startSync(from); return; }
    if (this.state === ST.SYNCING) this._setState(ST.OPEN);
  }

  _ack(p) {
    if (!p.cid) return;
    const i = this.outbox.findIndex((e) => e.cid === p.cid);
    if (i < 0) return; // a join/leave ack, or a repeat
    const [e] = this.outbox.splice(i, 1);
    const seq = typeof p.seq === 'number' ? p.seq : 0;
    if (seq > this.contiguous) {
      if (seq === this.contiguous + 1) { this.contiguous = seq; this._absorbOwn(); }
      else if (this.own.length < 64) this.own.push(seq);
    }
    this._changed();
    if (this.onack) this.onack({ cid: e.cid, id: p.id, seq, to: e.to, group: e.group });
  }

  _error(p) {
    const code = Number(p.code || 0);
    if (p.cid) {
      const e = this.outbox.find((x) => x.cid === p.cid);
      if (e && code >= 500 && code < 600) {
        e.sent = false;
        e.retryAt = Date.now() + 1000;
        this._flushOutbox();
      } else if (e) {
        this.outbox.splice(this.outbox.indexOf(e), 1);
        this._changed();
      }
    } else if (p.reason && /sync/.test(p.reason) && this.sync) {
      this.sync = null; // "sync failed" ends the sync; try again later
      this._timer('resync', 1000, () => this._startSync(this.contiguous));
    }
    if (this.onerror) this.onerror({ code, reason: p.reason || '', cid: p.cid });
  }

  _goaway(p) {
    const ms = Math.min(Number(p.reconnect_ms ?? this.backoffBaseMs * Math.random()), 3600000);
    this.goawayAt = Date.now();
    this.goaways++;
    const gen = this.gen;
    // messages may still arrive (and are ACKed) until then
    this._timer('goaway', ms, () => this._drop(gen, 'goaway', 1001));
  }
}
