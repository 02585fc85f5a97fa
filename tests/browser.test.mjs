// The demo page in a real browser (Debian's chromium driven by playwright-core): two signed-in
// pages and two anonymous pages on one gateway; everyone sees both users and "Anonymous: 2"; a
// message from a signed-in page reaches all four; the anonymous page's send is refused and says
// so. A screenshot is written to tests/artifacts/browser.png.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { TESTS_DIR, createRoom, hs256, startGateway, startRedis, teardown, test } from './lib/harness.mjs';

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
