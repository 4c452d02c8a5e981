"""Run the peers alone: ``python -m stress.peers [--dsn DSN] [--quick] [--systems a,b]``.

``python -m stress.bench`` runs them beside kongtask; this entry point exists to check the
peers' runners on their own.
"""

from __future__ import annotations

import argparse
import json
import sys

from .harness import PEER_KEYS, Bench, load_average, peer_systems, provide_server
from .report import markdown, run_matrix, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stress.peers", description=__doc__)
    p.add_argument("--dsn", help="a superuser DSN (default: a throwaway cluster, fsync on)")
    p.add_argument("--systems", default=",".join(PEER_KEYS))
    p.add_argument("--scenarios", default="throughput,latency,startup,enqueue")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2,000 jobs, 100 latency samples, 1 rep")
    args = p.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    systems = peer_systems(args.systems.split(","), say)
    n_tp, n_lat, reps = (2000, 100, 1) if args.quick else (20000, 500, args.reps)
    sizes = {"throughput": n_tp, "latency": n_lat, "startup": 1, "enqueue": n_tp}
    scenarios = {k: sizes[k] for k in args.scenarios.split(",")}
    with provide_server(args.dsn) as server:
        bench = Bench(server, say)
        try:
            say(f"server: {server.describe()}")
            results = run_matrix(bench, systems, scenarios, reps, say)
        finally:
            bench.close()
    base = "gw-ht" if any(s.key == "gw-ht" for s in systems) else None
    print(markdown(results, systems, base))
    print(json.dumps({"load_average": load_average(), "summary": summary(results, systems)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
