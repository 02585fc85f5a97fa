// The demo page in a real browser (Debian's chromium driven by playwright-core): two signed-in
// pages and two anonymous pages on one gateway; everyone sees both users and "Anonymous: 2"; a
// message from a signed-in page reaches all four; the anonymous page's send is refused and says
// so. A screenshot is written to tests/artifacts/browser.png. Then history: a page opened late shows
// the room's recent messages, and when its gateway restarts, the page reconnects by itself and
// shows exactly the messages it missed (tests/artifacts/browser-reconnect.png).
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  TESTS_DIR, createRoom, freePort, hs256, rawConnect, startGateway, startRedis, teardown, test, wsUrl,
} from './lib/harness.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARTIFACTS = path.join(TESTS_DIR, 'artifacts');

let redis;
let gw;
let browser;

before(async () => {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: the browser test needs Debian's chromium (apt-get install -y chromium)`);
  }
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: 'br' });
  createRoom(redis, 'br', 'lobby');
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close().catch(() => {});
  await teardown({ gateways: [gw], redis });
});

const presenceRows = (page) => page.$$eval('#presence li', (lis) => lis.map((li) => li.textContent.trim()));
const logLines = (page) => page.$$eval('#log li', (lis) => lis.map((li) => li.textContent.trim()));

test('demo page: presence, messages and the anonymous refusal in headless chromium', { timeout: 90000 }, async (t) => {
  const base = gw.publicUrl.replace(/^ws/, 'http').replace(/\/socket$/, '');
  const users = [['1', 'test_user'], ['2', 'test_user2']];
  const urls = [
    ...users.map(([sub, name]) => `${base}/?token=${hs256({ sub, username: name, exp: Math.floor(Date.now() / 1000) + 3600 })}`),
    `${base}/`,
    `${base}/`,
  ];
  const pages = [];
  for (const url of urls) {
    const page = await browser.newPage({ viewport: { width: 900, height: 500 } });
    page.on('pageerror', (e) => t.diagnostic(`page error: ${e.message}`));
    await page.goto(url);
    pages.push(page);
  }
  const [alice, bob, anon1, anon2] = pages;

  // every page shows both users (one row each) and "Anonymous: 2"
  for (const page of pages) {
    await page.waitForFunction(() => {
      const rows = [...document.querySelectorAll('#presence li')].map((li) => li.textContent.trim());
      return rows.includes('test_user') && rows.includes('test_user2') && rows.includes('Anonymous: 2') && rows.length === 3;
    }, null, { timeout: 15000 }).catch(async (e) => {
      throw new Error(`presence on ${page.url().slice(0, 60)}: ${JSON.stringify(await presenceRows(page))} (${e.message})`);
    });
  }
  assert.match(await alice.textContent('#status'), /signed in as test_user/);
  assert.match(await anon1.textContent('#status'), /watching anonymously/);

  // a signed-in page's message appears on all four
  await alice.fill('#body', 'hello from the browser');
  await alice.click('#send button');
  for (const page of pages) {
    await page.waitForFunction(() => [...document.querySelectorAll('#log li')]
      .some((li) => li.textContent.trim() === 'test_user: hello from the browser'), null, { timeout: 10000 })
      .catch(async () => { throw new Error(`message missing on a page: ${JSON.stringify(await logLines(page))}`); });
  }

  // the anonymous page's send is refused, says so, and nobody receives it
  await anon2.fill('#body', 'anonymous words');
  await anon2.click('#send button');
  await anon2.waitForFunction(() => document.getElementById('error').textContent.includes('Not signed in'), null, { timeout: 10000 });
  await new Promise((r) => setTimeout(r, 500));
  for (const page of pages) {
    assert.ok(!(await logLines(page)).some((l) => l.includes('anonymous words')), 'an anonymous message was delivered');
  }

  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const shot = path.join(ARTIFACTS, 'browser.png');
  await anon2.screenshot({ path: shot });
  t.diagnostic(`screenshot: ${shot}`);
  assert.ok(fs.statSync(shot).size > 1000);

  // a page closing removes its row for the others
  await bob.close();
  await alice.waitForFunction(() => ![...document.querySelectorAll('#presence li')].some((li) => li.textContent.trim() === 'test_user2'),
    null, { timeout: 10000 });
});

test('demo page: recent messages on join; a reconnect after its gateway restarted shows what was missed, once each', { timeout: 90000 }, async (t) => {
  createRoom(redis, 'br', 'hist');
  const port = await freePort();
  const listen = { GATEWAY_SERVER_LISTEN: `127.0.0.1:${port}` };
  let A = await startGateway({ redisPort: redis.port, prefix: 'br', name: 'histA', env: listen });
  const B = await startGateway({ redisPort: redis.port, prefix: 'br', name: 'histB' });
  try {
    const token = hs256({ sub: '9', username: 'writer', exp: Math.floor(Date.now() / 1000) + 3600 });
    const w = await rawConnect(wsUrl(B, { token }));
    w.send(['1', '1', 'rooms:hist', 'phx_join', {}]);
    await w.reply('1');
    let ref = 10;
    const say = async (body) => {
      ref += 1;
      w.send(['1', String(ref), 'rooms:hist', 'new_msg', { body }]);
      const r = await w.reply(String(ref));
      assert.equal(r[4].status, 'ok', JSON.stringify(r));
    };
    for (let i = 0; i < 3; i++) await say(`before ${i}`);

    // a page opened now shows the room's recent messages
    const page = await browser.newPage({ viewport: { width: 900, height: 500 } });
    page.on('pageerror', (e) => t.diagnostic(`page error: ${e.message}`));
    await page.goto(`http://127.0.0.1:${port}/?room=hist`);
    const messages = async () => (await logLines(page)).filter((l) => l.startsWith('writer: '));
    const waitMessages = (want, what) => page.waitForFunction((n) => [...document.querySelectorAll('#log li')]
      .filter((li) => li.textContent.startsWith('writer: ')).length >= n, want.length, { timeout: 15000 })
      .catch(async (e) => { throw new Error(`${what}: ${JSON.stringify(await logLines(page))} (${e.message})`); });
    await waitMessages(['', '', ''], 'recent messages on join');
    assert.deepEqual(await messages(), ['writer: before 0', 'writer: before 1', 'writer: before 2']);
    await say('live 0');
    await waitMessages(Array(4), 'a live message');

    // its gateway goes away (SIGTERM: the page's socket is closed with 1012 and it keeps trying);
    // five messages are said meanwhile; the gateway comes back on the same address
    await A.stop();
    await page.waitForFunction(() => document.getElementById('status').textContent.includes('reconnecting'), null, { timeout: 10000 });
    for (let i = 0; i < 5; i++) await say(`missed ${i}`);
    A = await startGateway({ redisPort: redis.port, prefix: 'br', name: 'histA2', env: listen });
    await waitMessages(Array(9), 'the missed messages after the reconnect');
    await page.waitForFunction(() => [...document.querySelectorAll('#log li')].some((li) => li.textContent.startsWith('reconnected: caught up')), null, { timeout: 5000 });
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(await messages(), [
      'writer: before 0', 'writer: before 1', 'writer: before 2', 'writer: live 0',
      'writer: missed 0', 'writer: missed 1', 'writer: missed 2', 'writer: missed 3', 'writer: missed 4',
    ]);
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    const shot = path.join(ARTIFACTS, 'browser-reconnect.png');
    await page.screenshot({ path: shot });
    t.diagnostic(`screenshot: ${shot}; log: ${JSON.stringify(await logLines(page))}`);
    await page.close();
  } finally {
    await Promise.all([A.stop(), B.stop()]);
  }
});
