// graphile-worker runner for the side-by-side benchmark (stress/peers).
//
// Run under Node 22 with NODE_PATH pointing at a folder holding graphile-worker 0.18.0.
// Protocol: one JSON object per line on the file descriptor $BENCH_FD ({"event": "ready"} when the
// pool runs, {"event": "result", ...} at the end); stdout/stderr carry the library's logs. In
// throughput mode it reports {"event": "drained"} when the last job starts and keeps the worker
// running until a line (or EOF) arrives on stdin, so the harness can watch the last commit.
//
//   node gw_runner.cjs MODE DSN N SETTINGS
//   MODE: throughput | latency | startup | enqueue;  SETTINGS: defaults | ht | ht-quiet
"use strict";
const fs = require("fs");
const { performance } = require("perf_hooks");
const { run, makeWorkerUtils, Logger } = require("graphile-worker");

const [mode, dsn, nArg, settings = "defaults"] = process.argv.slice(2);
const N = Number(nArg || 0);
const CONCURRENCY = 10;

function emit(obj) {
  fs.writeSync(Number(process.env.BENCH_FD || 3), JSON.stringify(obj) + "\n");
}
const now = () => (performance.timeOrigin + performance.now()) / 1000; // epoch seconds
const cpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};
const rssMb = () => process.memoryUsage().rss / 1048576;
const stdinLine = () =>
  new Promise((resolve) => {
    process.stdin.once("data", resolve);
    process.stdin.once("end", resolve);
    process.stdin.resume();
  });
const peakMb = () => process.resourceUsage().maxRSS / 1024;

function options(taskList) {
  const opts = {
    connectionString: dsn,
    concurrency: CONCURRENCY,
    noHandleSignals: true,
    taskList,
  };
  if (settings === "ht" || settings === "ht-quiet") {
    opts.preset = {
      worker: { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 },
    };
  }
  if (settings === "ht-quiet") {
    opts.logger = new Logger(() => () => {});
  }
  return opts;
}

async function throughput() {
  let count = 0;
  let first = 0;
  let cpuFirst = 0;
  let last = 0;
  let resolveDone;
  const done = new Promise((r) => (resolveDone = r));
  const tStart = now();
  const runner = await run(
    options({
      noop: async () => {
        if (count === 0) {
          first = now();
          cpuFirst = cpu();
        }
        count += 1;
        if (count === N) {
          last = now();
          resolveDone();
        }
      },
    }),
  );
  emit({ event: "ready", t: now() });
  await done;
  const cpuEnd = cpu();
  const rss = rssMb();
  emit({ event: "drained", t_start: tStart, first, last });
  await stdinLine();
  process.stdin.pause();
  await runner.stop();
  emit({
    event: "result",
    n: count,
    t_start: tStart,
    first,
    last,
    elapsed_s: last - first,
    jobs_per_s: (count - 1) / (last - first),
    cpu_us_per_job: ((cpuEnd - cpuFirst) * 1e6) / count,
    rss_mb: rss,
    peak_rss_mb: peakMb(),
  });
}

async function latency() {
  const lat = [];
  let resolveDone;
  const done = new Promise((r) => (resolveDone = r));
  const runner = await run(
    options({
      noop: async (payload) => {
        const start = now();
        if (!(payload.t > start - 600)) return; // the adder's warm-up job
        lat.push((start - payload.t) * 1000);
        if (lat.length === N) resolveDone();
      },
    }),
  );
  emit({ event: "ready", t: now() });
  await done;
  const rss = rssMb();
  await runner.stop();
  emit({ event: "result", latencies_ms: lat, rss_mb: rss, peak_rss_mb: peakMb() });
}

async function startup() {
  const utils = await makeWorkerUtils({ connectionString: dsn });
  await utils.withPgClient((c) => c.query("select 1"));
  let firstStart = 0;
  let resolveDone;
  const done = new Promise((r) => (resolveDone = r));
  const t0 = now();
  const runner = await run(
    options({
      noop: async () => {
        firstStart = now();
        resolveDone();
      },
    }),
  );
  const ready = now();
  await utils.addJob("noop", {});
  await done;
  await new Promise((r) => setTimeout(r, 300)); // let the completion land; queue empty again
  const s0 = now();
  await runner.stop();
  const s1 = now();
  await utils.release();
  emit({
    event: "result",
    ready_ms: (ready - t0) * 1000,
    first_job_ms: (firstStart - t0) * 1000,
    shutdown_ms: (s1 - s0) * 1000,
  });
}

async function enqueue() {
  const utils = await makeWorkerUtils({ connectionString: dsn });
  await utils.withPgClient((c) => c.query("select 1"));
  const single = [];
  for (let i = 0; i < 300; i++) {
    const t = now();
    await utils.addJob("noop", { i });
    single.push((now() - t) * 1000);
  }
  const chunk = 1000;
  const t0 = now();
  for (let done = 0; done < N; done += chunk) {
    const specs = [];
    for (let i = 0; i < Math.min(chunk, N - done); i++) {
      specs.push({ identifier: "noop", payload: { i } });
    }
    await utils.addJobs(specs);
  }
  const elapsed = now() - t0;
  await utils.release();
  emit({ event: "result", add_job_ms: single, bulk_jobs_per_s: N / elapsed });
}

const modes = { throughput, latency, startup, enqueue };
modes[mode]().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
