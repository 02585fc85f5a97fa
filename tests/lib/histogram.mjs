// Prometheus histograms read from a gateway's /metrics, for the storm test and the storm load run.

/** `gateway_<name>` histogram of a gateway's /metrics (lines containing `match`) as {count, sum, buckets: [[le, n]]}. */
export async function histogram(g, name, match = '') {
  const text = await (await fetch(`${g.adminUrl}/metrics`)).text();
  const h = { count: 0, sum: 0, buckets: [] };
  for (const line of text.split('\n')) {
    if (!line.includes(match)) continue;
    if (line.startsWith(`${name}_count`)) h.count = Number(line.split(' ').pop());
    else if (line.startsWith(`${name}_sum`)) h.sum = Number(line.split(' ').pop());
    else if (line.startsWith(`${name}_bucket`)) {
      const le = /le="([^"]+)"/.exec(line)[1];
      h.buckets.push([le === '+Inf' ? Infinity : Number(le), Number(line.split(' ').pop())]);
    }
  }
  return h;
}

/** Bucket bound under which a fraction `q` of the observations fell (from cumulative buckets). */
export function bucketQuantile(h, q) {
  const b = h.buckets.find(([, n]) => n >= q * h.count);
  return b ? b[0] : Infinity;
}

/** Per-bucket difference of two readings of the same histogram. */
export function delta(after, before) {
  return {
    count: after.count - before.count,
    sum: after.sum - before.sum,
    buckets: after.buckets.map(([le, n], i) => [le, n - (before.buckets[i] ? before.buckets[i][1] : 0)]),
  };
}

/** Several histograms of the same buckets added up. */
export function sum(hs) {
  return {
    count: hs.reduce((a, h) => a + h.count, 0),
    sum: hs.reduce((a, h) => a + h.sum, 0),
    buckets: hs[0].buckets.map(([le], j) => [le, hs.reduce((a, h) => a + h.buckets[j][1], 0)]),
  };
}

/** The value of an unlabelled counter or gauge `name` on a gateway's /metrics (0 if absent). */
export async function metric(g, name) {
  const text = await (await fetch(`${g.adminUrl}/metrics`)).text();
  const m = new RegExp(`^${name} (\\d+)$`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}
