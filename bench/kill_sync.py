"""kill -9 trial of sync_usage: nothing popped is lost once its body has arrived.

    .venv/bin/python bench/kill_sync.py [--records 60000] [--kills 10] [--batch 1000] [--seed 1]
    .venv/bin/python bench/kill_sync.py --stream [--kills 10] [--seed 1] [--rate 40]

`--stream`: the live stream against the real CLIProxyAPI 7.2.140 (../shared/cliproxyapi), see
bench/kill_stream.py.

Fills the fake proxy's queue (on 127.0.0.1) with `--records` records, runs
`sync_usage --follow` and kills it with SIGKILL `--kills` times at random moments while it
pops, then runs one clean `sync_usage`, and prints the ledgers: records the proxy handed out,
records whose body reached the portal's database, records counted (or quarantined), the
records lost after their body arrived (must be 0), and those cut on the wire (the proxy
popped them, the portal died before the body was committed: the proxy's limit, counted
separately). SQLite in a temporary folder, or the PostgreSQL database DATABASE_URL names
(its tables are emptied first). Not part of the test suite; exits 1 when anything was lost
after its body arrived.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.kill_trial import Trial  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1000, help="records per pop")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stream", action="store_true",
                        help="the live stream path against the real CLIProxyAPI 7.2.140")
    parser.add_argument("--rate", type=float, default=40,
                        help="--stream: client requests per second during the kills")
    parser.add_argument("--latency-requests", type=int, default=50,
                        help="--stream: requests timed from their answer to their count")
    args = parser.parse_args()
    if args.stream:
        from bench.kill_stream import main as stream_main

        return stream_main(kills=args.kills, seed=args.seed, rate=args.rate,
                           latency_requests=args.latency_requests)
    url = os.environ.get("DATABASE_URL", "")
    url = url if url.startswith("postgres") else ""
    with tempfile.TemporaryDirectory(prefix="keyportal-kill-") as tmp:
        trial = Trial(workdir=Path(tmp), database_url=url, seed=args.seed, batch=args.batch)
        result = trial.run(records=args.records, kills=args.kills)
    print(f"database: {'PostgreSQL' if url else 'SQLite'}; {args.records:,} records, "
          f"pops of {args.batch:,}, seed {args.seed}")
    print(result.summary())
    return 1 if result.lost_after_store or result.counted + result.lost_on_wire != result.served \
        else 0


if __name__ == "__main__":
    sys.exit(main())
