// A real Prometheus server (Debian's `prometheus` package) for the dashboard test: started on a free
// port with a private config and TSDB in a temp dir, scraping the given targets. Never the
// system service, never port 9090.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort, requireTool, waitFor, withTimeout } from './harness.mjs';

const running = new Set();
process.on('exit', () => {
  for (const p of running) {
    try { p.kill('SIGKILL'); } catch { /* gone */ }
  }
});

/**
 * Start `prometheus` scraping `targets` (host:port of /metrics) as one job every `scrapeIntervalS`.
 * Resolves {url, job, dir, query(expr, time?), queryRange(expr, start, end, step),
 * labelValues(label, match), logs(), stop()}; the API calls resolve the `data` of a successful
 * answer and throw on anything else.
 */
export async function startPrometheus({ targets, job = 'gateway', scrapeIntervalS = 1 }) {
  requireTool('prometheus', { why: 'a real Prometheus for the dashboard queries', install: 'apt-get install -y prometheus' });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-e2e-prometheus-'));
  const config = path.join(dir, 'prometheus.yml');
  fs.writeFileSync(config, [
    'global:',
    `  scrape_interval: ${scrapeIntervalS}s`,
    `  scrape_timeout: ${scrapeIntervalS}s`,
    `  evaluation_interval: ${scrapeIntervalS}s`,
    'scrape_configs:',
    `  - job_name: ${job}`,
    '    metrics_path: /metrics',
    '    static_configs:',
    `      - targets: [${targets.map((t) => `'${t}'`).join(', ')}]`,
    '',
  ].join('\n'));
  let lastErr;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const proc = spawn('prometheus', [
      `--config.file=${config}`,
      `--storage.tsdb.path=${path.join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`,
      '--log.level=warn',
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    running.add(proc);
    let out = '';
    proc.stdout.on('data', (d) => { out += d; });
    proc.stderr.on('data', (d) => { out += d; if (out.length > 1e6) out = out.slice(-5e5); });
    let exited = false;
    const exit = new Promise((resolve) => proc.on('exit', (code, signal) => { exited = true; running.delete(proc); resolve({ code, signal }); }));
    proc.on('error', (e) => { out += `\n[spawn error] ${e.message}\n`; });
    const url = `http://127.0.0.1:${port}`;
    try {
      await waitFor(async () => !exited && (await fetch(`${url}/-/ready`)).status === 200, 20000, 'prometheus /-/ready', 100);
    } catch (e) {
      lastErr = new Error(`prometheus on port ${port} did not start: ${e.message}\n${out.slice(-4000)}`);
      try { proc.kill('SIGKILL'); } catch { /* */ }
      await exit;
      continue;
    }
    const api = async (p, params) => {
      const res = await fetch(`${url}/api/v1/${p}?${new URLSearchParams(params)}`);
      const body = await res.json().catch(() => ({ status: 'unparsable', error: `HTTP ${res.status}` }));
      if (body.status !== 'success') {
        throw new Error(`prometheus /api/v1/${p} ${JSON.stringify(params)}: ${body.status} ${body.errorType ?? ''} ${body.error ?? ''}`);
      }
      return body.data;
    };
    return {
      url,
      job,
      dir,
      proc,
      query: (query, time) => api('query', time === undefined ? { query } : { query, time: String(time) }),
      queryRange: (query, start, end, step) => api('query_range', { query, start: String(start), end: String(end), step: String(step) }),
      labelValues: (label, match) => api(`label/${encodeURIComponent(label)}/values`, { 'match[]': match }),
      logs: () => out,
      async stop() {
        if (!exited) {
          proc.kill('SIGTERM');
          await withTimeout(exit, 10000, 'prometheus stop').catch(() => proc.kill('SIGKILL'));
        }
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  }
  fs.rmSync(dir, { recursive: true, force: true });
  throw lastErr;
}
