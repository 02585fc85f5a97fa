// The example application (examples/app/server.mjs) as a child process of a test: started on a
// free port (it prints {"event":"listening","port"} on stdout), with its own data directory.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO_ROOT, withTimeout } from './harness.mjs';

export const EXAMPLE_APP = path.join(REPO_ROOT, 'examples', 'app', 'server.mjs');

/**
 * Starts the example application. Returns {url, port, dataDir, proc, messages(), events(),
 * post(path, body, signature), stop()}; `url` is its base URL (`${url}/hooks/publish`).
 */
export async function startExampleApp({ secret, words, args = [], env = {} } = {}) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'example-app-'));
  const argv = [EXAMPLE_APP, '--port', '0', '--data-dir', dataDir, ...args];
  if (secret !== undefined) argv.push('--secret', secret);
  if (words !== undefined) argv.push('--blocked-words', words.join(','));
  const proc = spawn(process.execPath, argv, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stderr.on('data', (d) => { err += d; });
  const listening = new Promise((resolve, reject) => {
    proc.stdout.on('data', (d) => {
      out += d;
      const line = out.split('\n').find((l) => l.includes('"listening"'));
      if (line) resolve(JSON.parse(line));
    });
    proc.on('exit', (code) => reject(new Error(`example app exited with ${code}: ${err}`)));
  });
  const info = await withTimeout(listening, 10000, 'the example app to listen');
  const url = `http://127.0.0.1:${info.port}`;
  const get = async (p) => (await fetch(`${url}${p}`)).json();
  return {
    url,
    port: info.port,
    dataDir,
    proc,
    stderr: () => err,
    messages: (room) => get(`/messages${room ? `?room=${room}` : ''}`),
    events: (room) => get(`/events${room ? `?room=${room}` : ''}`),
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        const gone = new Promise((r) => proc.on('exit', r));
        proc.kill('SIGTERM');
        await withTimeout(gone, 5000, 'the example app to exit').catch(() => proc.kill('SIGKILL'));
      }
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
