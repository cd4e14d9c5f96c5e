"""Peak memory of `sync_usage` on one big pop, read through the spool.

    .venv/bin/python bench/spool_memory.py [--records 200000] [--cap-mib 16]

Fills the fake proxy's queue (on 127.0.0.1) with `--records` records, runs one
`manage.py sync_usage` that pops them all in one answer (USAGE_QUEUE_BATCH = --records) with
CLIPROXY_MAX_ANSWER_BYTES = --cap-mib, and prints the answer's size, the sync process's own
peak RSS (VmHWM), the pieces the body was counted in and the time. SQLite in a
temporary folder. Not part of the test suite; exits 1 when the counts do not match.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.sync_process import SyncProcess  # noqa: E402

# sync_usage, printing its own high-water RSS at exit. VmHWM belongs to the process's memory
# since exec; ru_maxrss would include the forking parent's (the fake proxy's) peak.
RUN = """
import runpy, sys
sys.argv = ["manage.py", "sync_usage"]
try:
    runpy.run_path("manage.py", run_name="__main__")
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("VmHWM", hwm, file=sys.stderr)
"""

PIECES = """
from usage.models import UsageBatch
print(UsageBatch.objects.filter(spool__isnull=False).count())
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--cap-mib", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench = SyncProcess(Path(tmp), keys=30, batch=args.records, retry_seconds=5,
                            busy_timeout=5)
        try:
            bench.env["CLIPROXY_MAX_ANSWER_BYTES"] = str(args.cap_mib * 1024 * 1024)
            bench.env["CLIPROXY_TIMEOUT"] = "120"
            bench.serve(args.records)
            size = len(json.dumps([r for _t, r in bench.proxy.queue]).encode())
            started = time.monotonic()
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                child = subprocess.run([sys.executable, "-c", RUN], cwd=ROOT, env=bench.env,
                                       stdout=out, stderr=err)
                err.seek(0)
                errors = err.read().decode()
            peak_kib = int(errors.rsplit("VmHWM", 1)[1].split()[0])
            seconds = time.monotonic() - started
            if child.returncode != 0:
                print(errors, file=sys.stderr)
                return 1
            counted = bench.totals()["counted"]
            pieces = int(bench.manage("shell", "-c", PIECES).split()[-1])
        finally:
            bench.close()
    print(f"answer: {args.records:,} records, {size / 2**20:.1f} MiB; "
          f"CLIPROXY_MAX_ANSWER_BYTES {args.cap_mib} MiB")
    print(f"sync_usage: peak RSS {peak_kib / 1024:.0f} MiB, {pieces} pieces, "
          f"{seconds:.1f} s, counted {counted:,}")
    return 0 if counted == args.records else 1


if __name__ == "__main__":
    sys.exit(main())
