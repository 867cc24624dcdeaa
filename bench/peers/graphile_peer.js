// The job queue a team would otherwise reach for: graphile-worker on the same
// Postgres, one job per recipient doing the same bookkeeping Herald does per
// send (one row update and a counter). Run by `herald bench engine
// --postgres`, never by hand: node graphile_peer.js DATABASE_URL JOBS CONCURRENCY
// Prints one JSON line: {"jobs", "seconds", "jobs_per_second"}.
const { Pool } = require("pg");
const { run, makeWorkerUtils, Logger } = require("graphile-worker");

// Quiet, as in production: a log line per job would be the bottleneck.
const quiet = new Logger(() => () => {});

async function main() {
  const [connectionString, jobsArg, concurrencyArg] = process.argv.slice(2);
  const jobs = Number(jobsArg);
  const concurrency = Number(concurrencyArg);
  const pool = new Pool({ connectionString, max: concurrency + 2 });
  await pool.query(`
    CREATE TABLE recipients (id BIGINT PRIMARY KEY, status TEXT NOT NULL DEFAULT 'pending');
    CREATE TABLE counters (id INT PRIMARY KEY, sent BIGINT NOT NULL DEFAULT 0);
    INSERT INTO counters (id) VALUES (1);`);
  await pool.query(
    "INSERT INTO recipients (id) SELECT i FROM generate_series(1, $1::bigint) i",
    [jobs]
  );
  const utils = await makeWorkerUtils({ pgPool: pool, logger: quiet });
  await utils.migrate();
  // Enqueued in bulk before the clock starts: only working them is timed.
  for (let first = 1; first <= jobs; first += 10000) {
    const last = Math.min(first + 9999, jobs);
    await pool.query(
      `SELECT graphile_worker.add_jobs(array_agg(
         (('send', json_build_object('id', i), NULL, NULL, NULL, NULL, NULL, NULL)
          )::graphile_worker.job_spec))
       FROM generate_series($1::bigint, $2::bigint) i`,
      [first, last]
    );
  }
  const started = process.hrtime.bigint();
  const runner = await run({
    pgPool: pool,
    concurrency,
    noHandleSignals: true,
    pollInterval: 50,
    logger: quiet,
    taskList: {
      send: async (payload, helpers) => {
        await helpers.withPgClient(async (client) => {
          await client.query("BEGIN");
          await client.query("UPDATE recipients SET status = 'sent' WHERE id = $1", [payload.id]);
          await client.query("UPDATE counters SET sent = sent + 1 WHERE id = 1");
          await client.query("COMMIT");
        });
      },
    },
  });
  for (;;) {
    const { rows } = await pool.query("SELECT sent FROM counters WHERE id = 1");
    if (Number(rows[0].sent) >= jobs) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await runner.stop();
  await utils.release();
  await pool.end();
  console.log(JSON.stringify({ jobs, seconds, jobs_per_second: jobs / seconds }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
