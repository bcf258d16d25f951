"""Two steps that read a large warehouse, each against the way it ran before, same synthetic data, same run, each
path in its own process (peak RSS is that process's):

- `choose`: a round's choice of interactions to score, in the warehouse (`select_from_warehouse`, what
  `hindsight_targets` runs) vs every kept triple loaded into pandas first (`select_for_scoring(kept_interactions(...))`);
- `judge`: judging one large day, a slice of text at a time (`assess_partition`, 20k triples) vs the whole day
  at once (its `slice_rows` raised past the day's size), without the model signal.

    python bench/bench_scale.py choose --n 1000000 [--keep /tmp/choose.duckdb]
    python bench/bench_scale.py judge --n 300000 [--keep /tmp/judge.duckdb]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_day(path: Path, n: int) -> None:
    """`n` triples on one day (a file without timestamps), each with a 7-message context of ~5 KB, 5,000 users."""
    from sdpo_platform.assessments import SCHEMA
    from sdpo_platform.warehouse import connect

    con = connect(path)
    con.execute(SCHEMA).fetchall()
    con.execute(f"""
        INSERT INTO conversations (conversation_id, record_id, source_file, line_no, source_format, language, messages,
                                   n_messages, n_chars, content_hash, partition_date, record_ids, user_hash)
        SELECT 'c' || i, 'c' || i, '/f', i, 'openai', 'en', [{{'role': 'user', 'content': 'x'}}], 1, 1, md5(i::VARCHAR),
               DATE '2026-01-15', ['c' || i], 'u' || (i % 5000)
        FROM range({n}) t(i)""").fetchall()
    con.execute(f"""
        INSERT INTO interactions
        SELECT 'c' || i || ':7', 'c' || i, 7,
               list_transform(range(7), lambda k: {{'role': CASE WHEN k % 2 = 0 THEN 'user' ELSE 'assistant' END,
                                                    'content': repeat('some words of turn ' || k || ' in ' || i || ' ', 25)}}),
               repeat('answer text ' || i || ' ', 60), ['too long, make it shorter', 'thanks!', 'that is wrong'][i % 3 + 1] || ' ' || i,
               true, 'feedback', CASE WHEN i % 5 = 0 THEN 'validation' ELSE 'train' END, DATE '2026-01-15'
        FROM range({n}) t(i)""").fetchall()
    con.close()


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
    if how in ("sliced", "whole"):
        from sdpo_platform.assessments import JUDGE_SLICE_ROWS, assess_partition
        from sdpo_platform.config import PlatformConfig

        cfg = PlatformConfig()
        cfg.informativeness.use_model = False
        assessed, _ = assess_partition(con, "2026-01-15", cfg, slice_rows=JUDGE_SLICE_ROWS if how == "sliced" else 10**12)
        return {"how": how, "seconds": time.perf_counter() - started, "chosen": assessed.astype(str).to_numpy().tolist(),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
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
    parser.add_argument("what", nargs="?", choices=("choose", "judge"), default="choose")
    parser.add_argument("--n", type=int, help="triples (default: 1,000,000 to choose from, 300,000 in the day to judge)")
    parser.add_argument("--keep", help="warehouse file to reuse (built when missing)")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "HOW"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    n = args.n or (1_000_000 if args.what == "choose" else 300_000)
    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / f"{args.what}.duckdb"
    if not path.exists():
        started = time.perf_counter()
        (build if args.what == "choose" else build_day)(path, n)
        print(f"built {n:,} triples in {time.perf_counter() - started:.1f} s: {path}", flush=True)
    paths = {"choose": (("warehouse", "in the warehouse (now)"), ("frame", "all kept triples into pandas (before)")),
             "judge": (("sliced", "a slice of text at a time (now)"), ("whole", "the whole day at once (before)"))}[args.what]
    results = {}
    for how, _ in paths:
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), how], check=True, capture_output=True, text=True)
        results[how] = json.loads(out.stdout.splitlines()[-1])
    for how, label in paths:
        r = results[how]
        print(f"{label:40s} {r['seconds']:6.1f} s  peak RSS {r['peak_rss_mb']:7,.0f} MB  rows {len(r['chosen']):,}")
    now, before = (results[how] for how, _ in paths)
    print(f"ratio: {before['seconds'] / now['seconds']:.2f}x the speed, {before['peak_rss_mb'] / now['peak_rss_mb']:.1f}x less memory; "
          f"same rows in the same order: {now['chosen'] == before['chosen']}")


if __name__ == "__main__":
    main()
