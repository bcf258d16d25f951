"""A round's choice of interactions to score: in the warehouse (`select_from_warehouse`, what `hindsight_targets`
runs) vs loading every kept triple into pandas first (`select_for_scoring(kept_interactions(...))`, what it ran
before). Same synthetic warehouse, same run, each path in its own process (peak RSS is that process's).

    python bench/bench_selection.py --n 1000000 [--keep /tmp/selection.duckdb]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(path: Path, n: int) -> None:
    """`n` one-turn triples over 30 days (user ~450, answer ~800, follow-up ~30 characters), two thirds kept."""
    from sdpo_platform.assessments import SCHEMA
    from sdpo_platform.warehouse import connect

    con = connect(path)
    con.execute(SCHEMA).fetchall()
    con.execute(f"""
        INSERT INTO interactions
        SELECT 'c' || i || ':1', 'c' || i, 1, [{{'role': 'user', 'content': repeat('question words ' || i || ' ', 30)}}],
               repeat('answer text ' || i || ' ', 60), 'too long, make it shorter ' || i, true, 'feedback',
               CASE WHEN i % 5 = 0 THEN 'validation' ELSE 'train' END, DATE '2026-01-01' + (i % 30)::INTEGER
        FROM range({n}) t(i)""").fetchall()
    con.execute(f"""
        INSERT INTO interaction_assessments
        SELECT 'c' || i || ':1', DATE '2026-01-01' + (i % 30)::INTEGER, 'refinement', [], 0.5, false, [], NULL, 0.7, i % 3 <> 0, NULL
        FROM range({n}) t(i)""").fetchall()
    con.close()


def measure(path: str, how: str) -> dict:
    from sdpo_platform.config import TargetsConfig
    from sdpo_platform.warehouse import connect

    con = connect(path)
    started = time.perf_counter()
    if how == "warehouse":
        from sdpo_platform.selection import select_from_warehouse

        chosen, _ = select_from_warehouse(con, TargetsConfig(), [])
    else:
        from sdpo_platform.assessments import kept_interactions
        from sdpo_platform.selection import select_for_scoring

        chosen = select_for_scoring(kept_interactions(con, []), TargetsConfig())
    seconds = time.perf_counter() - started
    return {"how": how, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "chosen": list(chosen.interaction_id)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--keep", help="warehouse file to reuse (built when missing)")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / "selection.duckdb"
    if not path.exists():
        started = time.perf_counter()
        build(path, args.n)
        print(f"built {args.n:,} triples in {time.perf_counter() - started:.1f} s: {path}", flush=True)
    results = {}
    for how in ("warehouse", "frame"):
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), how], check=True, capture_output=True, text=True)
        results[how] = json.loads(out.stdout.splitlines()[-1])
    same = results["warehouse"]["chosen"] == results["frame"]["chosen"]
    for how, label in (("warehouse", "in the warehouse (now)"), ("frame", "all kept triples into pandas (before)")):
        r = results[how]
        print(f"{label:40s} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_mb']:7,.0f} MB  chose {len(r['chosen'])}")
    w, f = results["warehouse"], results["frame"]
    print(f"ratio: {f['seconds'] / w['seconds']:.1f}x faster, {f['peak_rss_mb'] / w['peak_rss_mb']:.1f}x less memory; "
          f"same rows in the same order: {same}")


if __name__ == "__main__":
    main()
