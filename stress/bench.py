"""kongtask against graphile-worker 0.18, pgqueuer and procrastinate, side by side.

Usage (from the repository's root; the peers are provisioned into a cache on first use,
see ``stress/peers/provision.py``)::

    python -m stress.bench --check        # full run: fsync-on throwaway PostgreSQL, 3 reps
    python -m stress.bench --quick        # smoke run: 2,000 jobs, 100 latency samples, 1 rep
    python -m stress.bench --dsn postgresql://...   # an existing server (fresh databases)
    python -m stress.bench --systems kongtask       # kongtask alone
    python -m stress.bench --flat         # also 1,000,000 waiting / 100,000 future rows
    python -m stress.bench --systems kongtask,gw-ht --scenarios drain --million

Scenarios (concurrency 10, library defaults otherwise; each system in its own process on
a fresh database of the same server):

- throughput: 20,000 no-op jobs bulk-enqueued, then drained; jobs/s, CPU per job, RSS;
- latency: 500 jobs added 20 ms apart while the worker idles; add-to-handler-start
  p50/p95/p99 (the add time travels in the payload; the handler compares);
- startup: empty queue, start -> first job, and idle shutdown;
- enqueue: the library's client, single add_job round trip and add_jobs in chunks of 1,000;
- drain: what a user waits for: backlogs of 20,000 and 100,000 jobs (``--backlogs``;
  ``--million`` adds 1,000,000) bulk-enqueued without ANALYZE, timed from the worker's
  start to the commit of the last job's completion.

Prints markdown tables (median [min-max] of ``--reps``, ratios to graphile-worker), the
targets of issues 5 and 17 met or missed, and JSON (versions, Postgres settings, load average).
``--check`` exits 1 when a target fails in this run. See ``docs/performance.md``; the
machinery lives in ``stress/peers/``.
"""

from __future__ import annotations

from stress.peers.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
