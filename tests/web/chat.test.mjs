// The web chat example (examples/web) in a real Chromium, driven by
// playwright-core, against a real imd serving the page with --static.
//
// alice and bob (separate browser contexts: separate localStorage) log in,
// exchange messages and see delivery ticks; imd is killed with SIGKILL while
// alice has a message in her outbox, and restarted on the same data dir and
// ports; both pages reconnect by themselves, the outbox is resent, and each
// page shows every message exactly once and in order (read from the DOM).
// alice's page is then rebuilt from the browser state saved while that
// message was still unacknowledged (her browser died before it wrote the
// ack): the message is resent and synced, and shown once.
// Then bob reloads (history from localStorage, no duplicate after the
// reconnect) and a fresh device of bob's (empty storage) rebuilds the same
// history from the server with auth {since: 0} and sync. Then a group
// opened from the page, 450 messages pushed over the HTTP API that a fresh
// device pages through (sync_end.more), and POST /v1/admin/drain: both
// pages get goaway, the drained imd exits 0, and the pages move to a new imd
// on the same ports. Any sanitizer report on imd's stderr fails the test.
//
// Environment: IMD (the imd binary), WEB_DIR (examples/web), CHROMIUM
// (default /usr/bin/chromium), SCREENSHOT (optional: where to write a
// screenshot of alice's page). Exits 77 (meson: skipped) when chromium or
// playwright-core is missing, saying so.
import { spawn, execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const SKIP = 77;

function skip(why) {
  console.log(`SKIP: ${why}`);
  process.exit(SKIP);
}

const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
if (!fs.existsSync(chromiumPath)) skip(`${chromiumPath} not found (apt-get install chromium)`);
let chromium;
try {
  const require = createRequire(path.join(here, 'package.json'));
  ({ chromium } = require('playwright-core'));
} catch (e) {
  skip(`playwright-core not installed (cd tests/web && npm ci): ${e.message.split('\n')[0]}`);
}
const IMD = process.env.IMD;
const WEB_DIR = process.env.WEB_DIR || path.join(here, '../../examples/web');
if (!IMD) skip('IMD (path of the imd binary) not set');

const TIMEOUT = 20000;
let failures = 0;
// On a failure, what the page showed next to what was expected (ends only).
function shown(got, expected) {
  return ` (got ${got.length}: ...${JSON.stringify(got.slice(-4))}; expected ${expected.length}: ` +
         `...${JSON.stringify(expected.slice(-4))})`;
}

function check(cond, what) {
  if (cond) {
    console.log(`ok - ${what}`);
  } else {
    console.log(`not ok - ${what}`);
    failures++;
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'imd-web-'));
const data = path.join(tmp, 'data');
const wsPort = await freePort();
const httpPort = await freePort();
let imd = null;
let sanitizerReports = 0; // on any imd's stderr

// Starts imd and resolves once its HTTP listener is up (its own log line).
function startImd() {
  return new Promise((resolve, reject) => {
    const p = spawn(IMD, ['--ws', `127.0.0.1:${wsPort}`, '--tcp', 'off',
                          '--http', `127.0.0.1:${httpPort}`, '--data', data,
                          '--static', WEB_DIR, '--fsync', 'off', '--heartbeat', '1'],
                    { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const timer = setTimeout(() => reject(new Error(`imd did not start: ${out}`)), TIMEOUT);
    const onData = (b) => {
      out += b;
      if (out.includes('imd: at most')) { clearTimeout(timer); resolve(p); }
    };
    p.stdout.on('data', onData);
    p.stderr.on('data', (b) => {
      out += b;
      process.stderr.write(b);
      if (/AddressSanitizer|LeakSanitizer|runtime error:/.test(String(b))) sanitizerReports++;
    });
    p.on('exit', (code) => { clearTimeout(timer); if (!out.includes('imd: at most')) reject(new Error(`imd exited ${code}: ${out}`)); });
  });
}

function killImd() {
  return new Promise((resolve) => {
    imd.once('exit', () => resolve());
    imd.kill('SIGKILL');
  });
}

const token = (uid) => execFileSync(IMD, ['token', '--data', data, '--uid', uid]).toString().trim();

let browser = null;
async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  if (imd && imd.exitCode === null && imd.signalCode === null) imd.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
}

try {
  imd = await startImd();
  browser = await chromium.launch({ executablePath: chromiumPath, headless: true,
                                    args: ['--no-sandbox', '--disable-gpu'] });
  const url = (uid, peer) => `http://127.0.0.1:${httpPort}/#` + new URLSearchParams({
    uid, token: token(uid), ws: `ws://127.0.0.1:${wsPort}/ws`, peer }).toString();

  // storageState: a page restored from a saved browser state (playwright's)
  async function open(uid, peer, storageState) {
    const ctx = await browser.newContext({ viewport: { width: 900, height: 560 }, storageState });
    const page = await ctx.newPage();
    page.on('pageerror', (e) => { console.log(`page error (${uid}): ${e.message}`); failures++; });
    await page.goto(url(uid, peer));
    return page;
  }
  const waitState = (page, s) => page.waitForSelector(`#state[data-state="${s}"]`, { timeout: TIMEOUT });
  const texts = (page) => page.$$eval('#messages li .text', (els) => els.map((e) => e.textContent));
  const statusOf = (page, text) => page.$$eval('#messages li', (els, t) =>
    els.filter((e) => e.querySelector('.text').textContent === t).map((e) => e.dataset.status), text);
  // waits until text is the last message shown on page
  const waitText = (page, text) => page.waitForFunction((t) => {
    const els = document.querySelectorAll('#messages li .text');
    return els.length && els[els.length - 1].textContent === t;
  }, text, { timeout: TIMEOUT });
  const waitStatus = (page, text, status) => page.waitForFunction(([t, s]) =>
    [...document.querySelectorAll('#messages li')].some((e) =>
      e.querySelector('.text').textContent === t && e.dataset.status === s), [text, status],
  { timeout: TIMEOUT });
  async function say(page, text) {
    await page.fill('#compose input', text);
    await page.press('#compose input', 'Enter');
  }

  let alice = await open('alice', 'bob');
  const bob = await open('bob', 'alice');
  await Promise.all([waitState(alice, 'open'), waitState(bob, 'open')]);
  check(!(await alice.isVisible('#login')) && await alice.isVisible('#messages'),
        'the chat is shown, the login form hidden');
  check(true, 'both pages logged in (state open), page and script served by imd --static');
  // imd closes a connection idle for 2.5 x hb (2.5 s here): the pages' pings keep theirs
  await alice.waitForFunction(() => window.imchat.client.pongs >= 4, null, { timeout: TIMEOUT });
  check(await alice.evaluate(() => window.imchat.client.connections) === 1,
        'heartbeat: 4 pings answered, over the idle timeout, on the first connection');

  const expected = [];
  for (let i = 1; i <= 3; i++) {
    await say(alice, `hello bob ${i}`);
    expected.push(`hello bob ${i}`);
    await waitText(bob, `hello bob ${i}`);
    await say(bob, `hi alice ${i}`);
    expected.push(`hi alice ${i}`);
    await waitText(alice, `hi alice ${i}`);
  }
  check(JSON.stringify(await texts(alice)) === JSON.stringify(expected), 'alice sees the exchange in order');
  check(JSON.stringify(await texts(bob)) === JSON.stringify(expected), 'bob sees the exchange in order');
  await waitStatus(alice, 'hello bob 3', 'delivered');
  check(true, "alice's message gets the delivered tick (bob's receipt)");

  // ---- kill -9, a message in the outbox while imd is down, restart ----
  await killImd();
  await Promise.all([waitState(alice, 'waiting'), waitState(bob, 'waiting')]);
  check(true, 'both pages noticed the loss (state waiting, backoff)');
  await say(alice, 'sent while imd was down');
  expected.push('sent while imd was down');
  check((await statusOf(alice, 'sent while imd was down'))[0] === 'sending', 'it waits in the outbox (sending tick)');
  // what alice's browser has written by now: the message, unacknowledged, in the outbox
  await alice.waitForFunction(() => (JSON.parse(localStorage.getItem('imchat:alice') || '{}').outbox || [])
    .some((e) => e.data.t === 'sent while imd was down'), null, { timeout: TIMEOUT });
  const beforeAck = await alice.context().storageState();
  imd = await startImd();
  await Promise.all([waitState(alice, 'open'), waitState(bob, 'open')]);
  check(true, 'both pages reconnected by themselves after the restart');
  await waitText(bob, 'sent while imd was down');
  await waitStatus(alice, 'sent while imd was down', 'delivered');
  check(true, 'the outbox message reached bob after the restart, and was receipted');
  await say(bob, 'welcome back');
  expected.push('welcome back');
  await waitText(alice, 'welcome back');
  const ta = await texts(alice);
  const tb = await texts(bob);
  console.log(`alice shows: ${JSON.stringify(ta)}`);
  console.log(`bob shows:   ${JSON.stringify(tb)}`);
  check(JSON.stringify(ta) === JSON.stringify(expected), 'alice: every message exactly once and in order after kill -9');
  check(JSON.stringify(tb) === JSON.stringify(expected), 'bob: every message exactly once and in order after kill -9');
  check((await statusOf(alice, 'hello bob 1'))[0] === 'delivered', 'ticks survive the restart');

  // ---- alice's browser died before it wrote the ack: her page from the state saved then ----
  // The outbox resends the message (same cid: imd answers with the stored id) while
  // the sync brings the stored copy and bob's receipt first, without a cid.
  await alice.context().close();
  alice = await open('alice', 'bob', beforeAck);
  await waitState(alice, 'open');
  await waitStatus(alice, 'sent while imd was down', 'delivered');
  const restored = await texts(alice);
  check(JSON.stringify(restored) === JSON.stringify(expected),
        'alice from a state saved before the ack: her resent message once, with its receipt' +
        shown(restored, expected));

  // ---- reload: history from localStorage, no duplicates after the sync ----
  await bob.reload();
  await waitState(bob, 'open');
  await say(alice, 'after the reload');
  expected.push('after the reload');
  await waitText(bob, 'after the reload');
  const afterReload = await texts(bob);
  check(JSON.stringify(afterReload) === JSON.stringify(expected),
        'bob after a reload: history kept, nothing twice' + shown(afterReload, expected));

  // ---- a fresh device (no storage): the history comes from imd's sync ----
  const bob2 = await open('bob', 'alice');
  await waitState(bob2, 'open');
  await waitText(bob2, 'after the reload');
  check(JSON.stringify(await texts(bob2)) === JSON.stringify(expected), "bob's new device rebuilds the same history with auth {since: 0}");

  // ---- a group, opened from the page; the receipt of a member gives ✓✓ ----
  const apiKey = fs.readFileSync(path.join(data, 'api-key'), 'utf8').trim();
  const api = async (method, p, body) => {
    const r = await fetch(`http://127.0.0.1:${httpPort}${p}`, {
      method, headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(body) });
    if (r.status !== 200 && r.status !== 202) throw new Error(`${method} ${p}: ${r.status} ${await r.text()}`);
    return r.json();
  };
  await api('PUT', '/v1/groups/team/members', { add: ['alice', 'bob'] });
  await alice.fill('#newconv input', '#team');
  await alice.press('#newconv input', 'Enter');
  await say(alice, 'hello team');
  await bob.click('#convs li[data-conv="g:team"]', { timeout: TIMEOUT });
  await waitText(bob, 'hello team');
  await waitStatus(alice, 'hello team', 'delivered');
  check(JSON.stringify(await texts(bob)) === JSON.stringify(['hello team']), 'bob sees the group message in the group conversation');
  await alice.click('#convs li[data-conv="u:bob"]');
  await bob.click('#convs li[data-conv="u:alice"]');

  // ---- many messages while bob's new device is away: auth {since} + sync pages ----
  await bob2.context().close();
  const BULK = 450; // more than two pages of imd's default sync limit (200)
  for (let i = 1; i <= BULK; i++) {
    await api('POST', '/v1/messages', { from: 'alice', to: 'bob', cid: `bulk-${i}`, data: { t: `bulk ${i}` } });
    expected.push(`bulk ${i}`);
  }
  await waitText(bob, `bulk ${BULK}`);
  const live = await texts(bob);
  check(JSON.stringify(live) === JSON.stringify(expected),
        `bob's live page got ${BULK} more, once each, in order` + shown(live, expected));
  const bob3 = await open('bob', 'alice');
  await waitState(bob3, 'open');
  await waitText(bob3, `bulk ${BULK}`);
  check(JSON.stringify(await texts(bob3)) === JSON.stringify(expected),
        `a fresh device pages through ${expected.length} messages (sync_end.more) once each, in order`);
  const pages = await bob3.evaluate(() => window.imchat.client.syncPages);
  check(pages >= 3, `it took ${pages} sync answers (auth {since: 0}, then sync while more)`);

  // ---- goaway: POST /v1/admin/drain; the pages move (here: to the restarted imd) ----
  await bob3.context().close();
  const drained = new Promise((resolve) => imd.once('exit', (code) => resolve(code)));
  await api('POST', '/v1/admin/drain');
  await Promise.all([alice.waitForFunction(() => window.imchat.client.goaways > 0, null, { timeout: TIMEOUT }),
                     bob.waitForFunction(() => window.imchat.client.goaways > 0, null, { timeout: TIMEOUT })]);
  check(true, 'both pages got goaway from the draining imd');
  const code = await Promise.race([drained, new Promise((r) => setTimeout(() => r('timeout'), TIMEOUT))]);
  check(code === 0, `the drained imd exited 0 once the pages had left (${code})`);
  imd = await startImd();
  await Promise.all([waitState(alice, 'open'), waitState(bob, 'open')]);
  await say(alice, 'after the drain');
  expected.push('after the drain');
  await waitText(bob, 'after the drain');
  check(JSON.stringify(await texts(bob)) === JSON.stringify(expected), 'after goaway and a new imd: still once each, in order');

  if (process.env.SCREENSHOT) {
    await alice.screenshot({ path: process.env.SCREENSHOT });
    console.log(`screenshot: ${process.env.SCREENSHOT}`);
  }
} catch (e) {
  console.log(`not ok - ${e.stack || e}`);
  failures++;
} finally {
  await cleanup();
}
check(sanitizerReports === 0, 'no sanitizer report on the stderr of any imd');
console.log(failures ? `${failures} check(s) failed` : 'all checks passed');
process.exit(failures ? 1 : 0);
