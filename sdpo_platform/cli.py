"""`sdpo` command line. The demo lives in the Dagster layer, imported only when asked for."""

from __future__ import annotations

import argparse
from dataclasses import asdict
import datetime
import errno
import json
import os
import re
import sys
from pathlib import Path

from sdpo_platform.formats import FORMATS

# What bad input or arguments raise: reported as one line and exit 2 (argparse's convention for usage
# errors). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except USER_ERRORS as error:
        print(f"{parser.prog}: error: {describe(error)}", file=sys.stderr)
        return 2


def describe(error: Exception) -> str:
    """The message a user acts on, on one line: an OS error's reason and path without the errno prefix; a
    configuration error's fields and what is wrong with each."""
    from pydantic import ValidationError

    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror}: {error.filename}"
    if isinstance(error, ValidationError):
        source = f" in {os.environ['SDPO_CONFIG']}" if error.title == "PlatformConfig" and os.environ.get("SDPO_CONFIG") else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the whole file'}: {e['msg']}" for e in error.errors())
        return f"invalid configuration{source}: {problems}"
    return str(error)


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as every other bad input: one line, `sdpo: error: …`, exit status 2 (argparse prints
    the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"sdpo: error: {message} (see `{self.prog} --help`)\n")


def day(text: str) -> str:
    """argparse type of a partition: a real calendar day written YYYY-MM-DD."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="sdpo", description="Self-distillation from user interactions.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole lineage on a slice of real ShareGPT logs")
    demo.add_argument("--records", type=int, default=300, help="ShareGPT records written to the inbox")
    convert = sub.add_parser("model", help="resolve a model spec (converts the embedded default once)")
    convert.add_argument("spec", nargs="?", default="default")
    sub.add_parser("config", help="print every configuration knob with its default (markdown)")
    ing = sub.add_parser("ingest", help="ingest log files: raw → conversations → interactions for the days they touch")
    ing.add_argument("paths", nargs="+", help="JSONL / JSON / Parquet files (optionally .gz)")
    ing.add_argument("--partition", type=day, help="put every record on this day (YYYY-MM-DD) instead of its own timestamp")
    ing.add_argument("--format", choices=FORMATS, help="force the record format instead of detecting it per file")
    fgt = sub.add_parser("forget", help="erase ingested files: their records and everything the warehouse built from them, and list the target sets holding them (move them out of the inbox first)")
    fgt.add_argument("paths", nargs="+", help="files as they were ingested (paths; they may no longer exist)")
    fgt.add_argument("--purge-targets", action="store_true",
                     help="also delete the target sets that hold their interactions and the heatmap pages logged to MLflow that show them "
                          "(listed either way; the next round rescores without them)")
    st = sub.add_parser("stats", help="warehouse counts (records, conversations, interactions, quarantine by reason)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    adv = sub.add_parser("advantages", help="per-token hindsight advantages of JSONL rows, optionally as an HTML heatmap")
    adv.add_argument("input", help="JSONL rows: messages or prompt, followup, optional response")
    adv.add_argument("--out", required=True, help="JSONL written: each row plus response, tokens, advantages, means")
    adv.add_argument("--html", help="also write token heatmaps (blue = reinforced, red = penalized)")
    adv.add_argument("--model", help="model spec (default: the config's model)")
    adv.add_argument("--seed", type=int, default=0, help="torch seed set before generating responses for rows without one (decoding is greedy, so the text does not depend on it)")
    tgt = sub.add_parser("targets", help="list target sets on disk, or prune what no plan needs (old shards, dead workers' files)")
    tgt.add_argument("action", nargs="?", choices=("list", "prune"), default="list")
    tgt.add_argument("--dry-run", action="store_true", help="prune: only say what would be removed")
    tgt.add_argument("--grace-hours", type=float, default=1.0, help="prune: leave leftovers younger than this (default 1)")
    tgt.add_argument("--keep-days", type=float, default=30.0, help="prune: keep runs' snapshots, and the shards they pin, this long (default 30)")
    tgt.add_argument("--json", action="store_true", help="print one JSON document")
    inf = sub.add_parser("informativeness", help="label JSONL follow-ups: kind, informativeness in [0, 1], keep, safety flag")
    inf.add_argument("input", help="JSONL rows: messages or prompt, followup, optional response (generated greedily when missing)")
    inf.add_argument("--out", required=True, help="JSONL written: each row plus followup_kind, informativeness, keep, safety_flag")
    inf.add_argument("--model", help="model spec (default: the config's model)")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """The subcommand's work; its exit status."""
    if args.command == "demo":
        from assets.demo import run_demo

        run_demo(args.records)
    elif args.command == "model":
        from sdpo_platform.models import resolve_model

        print(resolve_model(args.spec))
    elif args.command == "advantages":
        from sdpo_platform.advantages import run

        written = run(args.input, args.out, args.html, args.model, args.seed)
        print(f"{written} rows -> {args.out}" + (f", heatmap -> {args.html}" if args.html else ""))
    elif args.command == "informativeness":
        from sdpo_platform.informativeness import run_jsonl

        written = run_jsonl(args.input, args.out, args.model)
        print(f"{written} rows -> {args.out}")
    elif args.command == "ingest":
        return _ingest(args)
    elif args.command == "forget":
        return _forget(args)
    elif args.command == "stats":
        from sdpo_platform.warehouse import connect, stats

        with connect() as con:
            counts = stats(con)
        print(json.dumps(counts) if args.json else "\n".join(f"{k}: {v}" for k, v in counts.items()))
    elif args.command == "targets":
        return _targets(args)
    elif args.command == "config":
        from sdpo_platform.config import config_reference

        print(config_reference())
    return 0


def _stderr(line: str) -> None:
    """Progress goes to stderr, so stdout stays one JSON document."""
    print(line, file=sys.stderr, flush=True)


def _ingest(args) -> int:
    """Exit 0 when every file was read and every touched partition passed its checks, else 1 (after
    doing everything it could: one bad file never stops the others)."""
    from sdpo_platform.config import PlatformConfig
    from sdpo_platform.pipeline import ingest_and_clean
    from sdpo_platform.warehouse import connect

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(errno.ENOENT, "no such file", ", ".join(missing))
    with connect() as con:
        outcome = ingest_and_clean(con, args.paths, PlatformConfig.load(), args.partition, args.format, log=_stderr)
    for error in outcome["errors"]:
        print(f"error: {error}", file=sys.stderr)
    print(json.dumps(outcome, indent=2))
    failed = any(v != "passed" for day in outcome["checks"].values() for v in day.values())
    return 1 if outcome["errors"] or failed else 0


def _targets(args) -> int:
    from sdpo_platform import target_sets

    if args.grace_hours < 0 or args.keep_days < 0:
        raise ValueError(f"--grace-hours and --keep-days must be >= 0, not {args.grace_hours} and {args.keep_days}")
    grace_s, keep_s = args.grace_hours * 3600, args.keep_days * 86400
    registered = _registered_snapshots_once()
    if args.action == "list":
        rows = target_sets.as_dicts(target_sets.summarize(d, grace_s, keep_s, registered) for d in target_sets.set_dirs())
        for problem in (p for row in rows for p in row["problems"]):
            _stderr(f"warning: {problem}")
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
            print(f"{row['target_set']}  {row['model_revision']}  {row['dtype']}  {row['rows']} rows  "
                  f"{row['shards_scored']}/{row['shards']} shards  {_mib(row['size_bytes'])}  last {row['last_written']}"
                  + (f"  ({row['leftover_files']} leftover file(s), {_mib(row['leftover_bytes'])}: sdpo targets prune)" if row["leftover_files"] else ""))
        if not rows and not args.json:
            print("no target sets yet")
        return 0
    reports = []
    for set_dir in target_sets.set_dirs():  # each set reported as it is pruned
        report = asdict(target_sets.prune_set(set_dir, grace_s, args.dry_run, keep_s, registered))
        reports.append(report)
        for problem in report["problems"]:
            _stderr(f"warning: {problem}")
        if not args.json:
            verb = "would remove" if args.dry_run else "removed"
            print(f"{report['target_set']}: {verb} {len(report['removed'])} file(s), {_mib(report['freed_bytes'])}"
                  + (f"; {report['kept_young']} younger than the grace period kept" if report["kept_young"] else ""), flush=True)
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


def _registered_snapshots_once():
    """The registry's `targets_snapshot` tags, read once and only if asked (an expired snapshot was
    found); None, with a warning, when the registry cannot be read, so prune keeps every snapshot."""
    import os

    read: list = []

    def registered():
        if not read:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a remote server that is down: fail in seconds
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            try:
                from sdpo_platform.registry import registered_snapshots

                read.append(registered_snapshots())
            except Exception as error:  # any failure only means: keep what the registry might name
                _stderr(f"warning: cannot read the model registry ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
                read.append(None)
        return read[0]

    return registered


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _forget(args) -> int:
    """Exit 0 when the rebuilt days passed their checks and every target set could be checked (and purged), else 1."""
    from sdpo_platform.config import PlatformConfig
    from sdpo_platform.paths import inbox_dir
    from sdpo_platform.pipeline import forget_and_rebuild
    from sdpo_platform.warehouse import connect

    with connect() as con:
        outcome = forget_and_rebuild(con, args.paths, PlatformConfig.load(), inbox=inbox_dir(), log=_stderr, purge_targets=args.purge_targets)
    print(json.dumps(outcome, indent=2))
    failed = any(v != "passed" for day in outcome["checks"].values() for v in day.values())
    return 1 if failed or outcome["unreadable"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
