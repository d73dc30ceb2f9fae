// The chat page: one user, conversations with peers (1:1) and groups, on
// imclient.js. See README.md here for the conventions (message data, read
// receipts, what is kept in localStorage).
import { ImClient } from './imclient.js';

const $ = (sel) => document.querySelector(sel);
const MAX_KEPT = 2000; // messages kept in localStorage per uid

// ---- configuration: #uid=…&token=…&ws=…&peer=… (fragment or query) -------
function params() {
  const p = new URLSearchParams(location.hash.slice(1) || location.search.slice(1));
  return Object.fromEntries(p.entries());
}

const defaultWs = () => `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.hostname || '127.0.0.1'}:8080/ws`;

// ---- state kept across reloads ------------------------------------------
// imchat:<uid> = {device, contiguous, outbox, messages, receipted, convs, held,
//   lateRcpt}
// A message: {key, id, cid, from, conv, text, ts, mine, status}
//   status: 'sending' (in the outbox), 'stored' (acked by imd, or received),
//   'delivered' (a receipt from the peer arrived).
function load(uid) {
  try { return JSON.parse(localStorage.getItem('imchat:' + uid)) || {}; } catch (e) { return {}; }
}

let S = null;          // the state above
let client = null;
let current = null;    // the open conversation: 'u:bob' or 'g:team'
let saveTimer = null;
const pendingReceipts = new Map(); // sender uid -> [ids] to acknowledge once synced

// Writes the state now; save() batches the writes of a burst (50 ms), and
// leaving the page (reload, close, tab hidden) writes at once: a reload
// inside the batch would otherwise start from a state older than what the
// server has acknowledged.
function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = null;
  if (!S || !client) return;
  S.contiguous = client.contiguous;
  S.outbox = client.pendingMessages();
  if (S.messages.length > MAX_KEPT) S.messages.splice(0, S.messages.length - MAX_KEPT);
  localStorage.setItem('imchat:' + S.uid, JSON.stringify(S));
}

function save() {
  if (!saveTimer) saveTimer = setTimeout(saveNow, 50);
}
addEventListener('pagehide', saveNow);
document.addEventListener('visibilitychange', () => { if (document.hidden) saveNow(); });

function convOf(m, me) {
  if (m.group) return 'g:' + m.group;
  if (m.from === me) return 'u:' + m.to;
  return 'u:' + m.from;
}

function convLabel(c) { return c.startsWith('g:') ? '#' + c.slice(2) : c.slice(2); }

function addConv(c, select) {
  if (!S.convs.includes(c)) S.convs.push(c);
  if (select) current = c;
  renderConvs();
  if (select) renderMessages();
  save();
}

// ---- rendering -------------------------------------------------------------
const TICKS = { sending: '\u25F7', stored: '\u2713', delivered: '\u2713\u2713' };

function renderConvs() {
  const ul = $('#convs');
  ul.textContent = '';
  for (const c of S.convs) {
    const li = document.createElement('li');
    li.dataset.conv = c;
    li.textContent = convLabel(c);
    const unread = S.messages.filter((m) => m.conv === c && !m.mine && !m.seen).length;
    if (unread && c !== current) {
      const b = document.createElement('span');
      b.className = 'unread';
      b.textContent = unread;
      li.append(b);
    }
    if (c === current) li.className = 'active';
    li.onclick = () => { current = c; renderConvs(); renderMessages(); };
    ul.append(li);
  }
}

function messageItem(m) {
  const li = document.createElement('li');
  li.dataset.key = m.key;
  if (m.id) li.dataset.id = m.id;
  li.dataset.status = m.status;
  if (m.mine) li.className = 'mine';
  if (!m.mine && m.conv.startsWith('g:')) {
    const f = document.createElement('span');
    f.className = 'from';
    f.textContent = m.from;
    li.append(f);
  }
  const t = document.createElement('span');
  t.className = 'text';
  t.textContent = m.text;
  li.append(t);
  const meta = document.createElement('span');
  meta.className = 'meta';
  meta.textContent = m.ts ? new Date(m.ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) + ' ' : '';
  if (m.mine) {
    const tick = document.createElement('span');
    tick.className = 'tick';
    tick.title = m.status;
    tick.textContent = TICKS[m.status];
    meta.append(tick);
  }
  li.append(meta);
  return li;
}

function renderMessages() {
  const ol = $('#messages');
  ol.textContent = '';
  $('#title').textContent = current ? convLabel(current) : 'pick a peer or a group';
  const on = !!current;
  $('#compose input').disabled = !on;
  $('#compose button').disabled = !on;
  if (!current) return;
  for (const m of S.messages) {
    if (m.conv !== current) continue;
    m.seen = true;
    ol.append(messageItem(m));
  }
  ol.scrollTop = ol.scrollHeight;
  save();
}

function showMessage(m) {
  if (m.conv === current) {
    m.seen = true;
    const ol = $('#messages');
    const old = ol.querySelector(`li[data-key="${CSS.escape(m.key)}"]`);
    const li = messageItem(m);
    if (old) old.replaceWith(li); else { ol.append(li); ol.scrollTop = ol.scrollHeight; }
  }
  if (!S.convs.includes(m.conv)) S.convs.push(m.conv);
  renderConvs();
}

// ---- messages in and out ----------------------------------------------------
function byId(id) { return S.messages.find((m) => m.id === id); }

function received(m) {
  const me = S.uid;
  const d = m.data;
  if (d && Array.isArray(d.rcpt)) { // a read receipt convention, never shown
    if (m.from === me) { // one of ours (sent from this or another device)
      for (const id of d.rcpt) S.receipted.push(id);
      for (const [, ids] of pendingReceipts)
        for (const id of d.rcpt) { const i = ids.indexOf(id); if (i >= 0) ids.splice(i, 1); }
    } else {
      for (const id of d.rcpt) {
        const mine = byId(id);
        if (mine && mine.mine && mine.status !== 'delivered') { mine.status = 'delivered'; showMessage(mine); }
        else if (!mine && unackedOwn() && S.lateRcpt.length < MAX_KEPT) S.lateRcpt.push(id);
      }
    }
    save();
    return;
  }
  if (!d || typeof d.t !== 'string' || m.room) return; // not a chat message of this page
  if (byId(m.id)) return; // our own, already shown from the outbox
  const msg = { key: m.id, id: m.id, from: m.from, conv: convOf(m, me), text: d.t, ts: m.ts,
                mine: m.from === me, status: 'stored' };
  if (msg.mine && S.held.length < MAX_KEPT && unackedOwn()) { // may be one of those: wait for their acks
    S.held.push(msg);
    save();
    return;
  }
  S.messages.push(msg);
  showMessage(msg);
  if (!msg.mine && !S.receipted.includes(m.id)) {
    if (!pendingReceipts.has(m.from)) pendingReceipts.set(m.from, []);
    pendingReceipts.get(m.from).push(m.id);
    if (client.state === 'open') scheduleReceipts();
  }
  save();
}

// A message of ours that the server stored but whose ack this page never
// saw (the browser died first, or a reload came before the state was
// written) is resent from the outbox with its cid, and imd answers with the
// first id; but the sync after auth brings the stored copy before that ack,
// and a downstream msg carries no cid. So our own messages that come while
// an outbox message has no id yet are held (in the saved state) until the
// outbox has its acks, then shown unless an ack gave one of them its id.
// Receipts for ids unknown then are kept too (lateRcpt), for those acks.
function unackedOwn() {
  const pending = client.pendingMessages();
  if (!pending.length) return false;
  const cids = new Set(pending.map((e) => e.cid));
  return S.messages.some((x) => x.mine && !x.id && cids.has(x.cid));
}

function releaseHeld() {
  if (unackedOwn() || !(S.held.length || S.lateRcpt.length)) return;
  for (const m of S.held.splice(0)) {
    if (byId(m.id)) continue;
    if (S.lateRcpt.includes(m.id)) m.status = 'delivered';
    S.messages.push(m);
    showMessage(m);
  }
  S.lateRcpt.length = 0;
  save();
}

// Receipts go out once the sync is over, so a page that re-reads its whole
// history learns first which ones it sent already; live ones are batched
// for a moment (a burst of messages gets one receipt per sender).
let receiptTimer = null;
function scheduleReceipts() {
  if (!receiptTimer) receiptTimer = setTimeout(() => { receiptTimer = null; flushReceipts(); }, 100);
}

function flushReceipts() {
  for (const [to, ids] of pendingReceipts) {
    if (ids.length) {
      client.send({ to }, { rcpt: ids.slice() });
      S.receipted.push(...ids);
    }
  }
  pendingReceipts.clear();
  if (S.receipted.length > MAX_KEPT) S.receipted.splice(0, S.receipted.length - MAX_KEPT);
  save();
}

function sendText(text) {
  const target = current.startsWith('g:') ? { group: current.slice(2) } : { to: current.slice(2) };
  const cid = client.send(target, { t: text });
  const msg = { key: cid, cid, from: S.uid, conv: current, text, ts: Date.now(), mine: true,
                status: 'sending' };
  S.messages.push(msg);
  showMessage(msg);
  save();
}

function acked({ cid, id }) {
  const m = S.messages.find((x) => x.cid === cid && x.mine);
  if (m) {
    m.id = id;
    if (m.status === 'sending') m.status = 'stored';
    const r = S.lateRcpt.indexOf(id); // its receipt came first (see unackedOwn)
    if (r >= 0) { S.lateRcpt.splice(r, 1); m.status = 'delivered'; }
    showMessage(m);
  }
  releaseHeld();
  save();
}

// ---- start ---------------------------------------------------------------------
function start(cfg) {
  S = load(cfg.uid);
  S.uid = cfg.uid;
  S.device ||= 'web-' + Math.random().toString(16).slice(2, 10);
  S.messages ||= [];
  S.receipted ||= [];
  S.convs ||= [];
  S.contiguous ||= 0;
  S.outbox ||= [];
  S.held ||= [];
  S.lateRcpt ||= [];
  $('#me').textContent = `${cfg.uid} (${S.device})`;
  $('#login').hidden = true;
  $('#chat').hidden = false;
  client = new ImClient({ urls: [cfg.ws || defaultWs()], uid: cfg.uid, token: cfg.token,
                          device: S.device, since: S.contiguous, outbox: S.outbox });
  client.onmessage = received;
  client.onack = acked;
  client.onchange = save;
  client.onerror = (e) => {
    if (!e.cid) return;
    const m = S.messages.find((x) => x.cid === e.cid && x.status === 'sending');
    if (m && e.code < 500) { m.status = 'failed'; m.text += ` (refused: ${e.reason})`; showMessage(m); }
    releaseHeld();
  };
  client.onstate = (s, detail) => {
    const el = $('#state');
    el.dataset.state = s;
    el.textContent = s === 'waiting' ? `reconnecting in ${Math.round(detail.delay / 100) / 10} s`
      : s === 'stopped' && detail ? String(detail) : s;
    if (s === 'open') flushReceipts();
  };
  window.imchat = { client, state: S }; // for the console and the tests
  if (cfg.peer) addConv(cfg.peer.startsWith('#') ? 'g:' + cfg.peer.slice(1) : 'u:' + cfg.peer, true);
  else if (S.convs.length) { current = S.convs[0]; renderConvs(); renderMessages(); }
  releaseHeld(); // held by an earlier page whose outbox has no unacknowledged message left
  client.start();
}

$('#compose').onsubmit = (ev) => {
  ev.preventDefault();
  const input = ev.target.text;
  const text = input.value.trim();
  if (text && current) sendText(text);
  input.value = '';
};

$('#newconv').onsubmit = (ev) => {
  ev.preventDefault();
  const v = ev.target.peer.value.trim();
  if (!v) return;
  addConv(v.startsWith('#') ? 'g:' + v.slice(1) : 'u:' + v, true);
  ev.target.peer.value = '';
};

$('#login').onsubmit = (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const cfg = { uid: f.uid.value.trim(), token: f.token.value.trim(), ws: f.ws.value.trim() };
  history.replaceState(null, '', '#' + new URLSearchParams(cfg).toString());
  start(cfg);
};

const cfg = params();
if (cfg.uid && cfg.token) start(cfg);
else $('#login').hidden = false;
