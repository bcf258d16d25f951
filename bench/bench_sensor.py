"""The inbox sensor's question — which days do these new files touch? — answered two ways, same files:

- **day scan** (`ingest.record_days`, what the sensor runs): ingestion's readers and day rule, days only;
- **scratch ingest** (the sensor before 2026-11-27): the files ingested into an in-memory warehouse, then
  its partitions read back — the raw text, record ids and all.

Each runs in its own process (peak RSS = that process's `ru_maxrss`); both must give the same days.

    python bench/bench_sensor.py /tmp/ingestwork/data/wildchat_000.jsonl   # figures in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(method: str, files: list[str]) -> None:
    started = time.perf_counter()
    if method == "day_scan":
        from sdpo_platform.ingest import record_days

        days = record_days(files)
    else:
        from sdpo_platform.ingest import ingest_files
        from sdpo_platform.warehouse import connect

        scratch = connect(":memory:")
        days = ingest_files(scratch, files).partitions
        scratch.close()
    seconds = time.perf_counter() - started
    print(json.dumps({"method": method, "seconds": round(seconds, 2), "days": days,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--child", choices=["day_scan", "scratch_ingest"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.files)
    runs = {}
    for method in ("scratch_ingest", "day_scan"):
        out = subprocess.run([sys.executable, __file__, "--child", method, *args.files], check=True, capture_output=True, text=True)
        runs[method] = json.loads(out.stdout.strip().splitlines()[-1])
    scan, ingest = runs["day_scan"], runs["scratch_ingest"]
    if scan["days"] != ingest["days"]:
        raise SystemExit(f"the methods disagree: {scan['days']} vs {ingest['days']}")
    megabytes = sum(Path(f).stat().st_size for f in args.files) / 1e6
    print(f"{len(args.files)} file(s), {megabytes:,.0f} MB, {len(scan['days'])} days (both methods agree)")
    print(f"{'':16}{'seconds':>9}{'peak RSS MB':>13}")
    for name, run in (("scratch ingest", ingest), ("day scan", scan)):
        print(f"{name:16}{run['seconds']:>9.1f}{run['peak_rss_mb']:>13,}")
    print(f"{'ratio':16}{ingest['seconds'] / scan['seconds']:>8.1f}x{ingest['peak_rss_mb'] / scan['peak_rss_mb']:>12.1f}x")


if __name__ == "__main__":
    main()
