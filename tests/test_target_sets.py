"""`sdpo targets`: a grown set's old shards, dead workers' temp files and claims go; nothing a plan,
a reader inside the grace period or a live worker needs does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd

from sdpo_platform.cli import main as sdpo
from sdpo_platform.config import TargetsConfig
from sdpo_platform.target_sets import leftovers, prune_set, summarize
from sdpo_platform.target_workers import materialize_targets
from sdpo_platform.selection import select_for_scoring
from sdpo_platform.targets import read_manifest, read_targets
from tests.test_targets import logged_day, tiny  # noqa: F401  (fixture)


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_prune_removes_only_what_no_plan_reader_or_live_worker_needs(tiny, tiny_model_dir, sdpo_home, capsys):
    model, tok = tiny
    cfg = TargetsConfig(shard_size=2, max_train=10**6, max_validation=10**6, top_k=0, max_response_tokens=8)
    day1 = logged_day("2026-01-05", 8, turns=2)
    grown = pd.concat([day1.iloc[2:], logged_day("2026-01-06", 3, turns=2)])  # one conversation forgotten, a day added
    first = materialize_targets(select_for_scoring(day1, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    before = {s["file"] for s in read_manifest(first.path)["shards"]}
    second = materialize_targets(select_for_scoring(grown, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    set_dir = Path(second.path)
    orphans = before - {s["file"] for s in read_manifest(set_dir)["shards"]}
    assert orphans  # the grown plan replaced at least one shard

    host = socket.gethostname()
    (set_dir / "shard-dead.claim").write_text(json.dumps({"host": host, "pid": dead_pid(), "token": "a"}))
    (set_dir / "shard-live.claim").write_text(json.dumps({"host": host, "pid": os.getpid(), "token": "b"}))
    (set_dir / ".shard-x.parquet.old.tmp").write_bytes(b"x" * 10)
    age(set_dir / ".shard-x.parquet.old.tmp", 7200)
    (set_dir / ".shard-y.parquet.new.tmp").write_bytes(b"y")  # a writer at work
    (set_dir / "heatmaps").mkdir()
    (set_dir / "heatmaps" / "extremes-run1.html").write_text("<html>")

    found = leftovers(set_dir)  # the manifest was just re-planned: old shards may still be read
    assert {p.name for p in found.removable} == {"shard-dead.claim", ".shard-x.parquet.old.tmp"}
    assert found.young == len(orphans) + 1 and found.problems == []

    age(set_dir / "manifest.json", 7200)
    assert summarize(set_dir).leftover_files == len(orphans) + 2
    dry = prune_set(set_dir, dry_run=True)
    assert sorted(dry.removed) == sorted(orphans | {"shard-dead.claim", ".shard-x.parquet.old.tmp"})
    assert all((set_dir / name).exists() for name in dry.removed)  # a dry run removes nothing

    assert sdpo(["targets", "prune"]) == 0
    assert f"{set_dir.name}: removed {len(orphans) + 2} file(s)" in capsys.readouterr().out
    left = {p.name for p in set_dir.iterdir()}
    assert not left & orphans and {"shard-live.claim", ".shard-y.parquet.new.tmp", "heatmaps"} <= left
    assert (set_dir / "heatmaps" / "extremes-run1.html").exists()

    # the set still reads in full and a rerun still scores nothing
    assert len(read_targets(set_dir)) == len(grown)
    again = materialize_targets(select_for_scoring(grown, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    assert again.shards_scored == 0 and again.shards_reused == again.shards

    assert sdpo(["targets", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["target_set"] == set_dir.name and listed["rows"] == len(grown)
    assert listed["shards_scored"] == listed["shards"] and listed["leftover_files"] == 0


def test_targets_command_on_an_empty_data_root(sdpo_home, capsys):
    assert sdpo(["targets"]) == 0
    assert "no target sets yet" in capsys.readouterr().out
    assert sdpo(["targets", "prune", "--grace-hours", "-1"]) == 2
    assert "--grace-hours and --keep-days must be >= 0" in capsys.readouterr().err


def test_a_snapshot_pins_a_runs_rows_while_the_set_grows_until_its_retention_ends(tiny, tiny_model_dir, sdpo_home):
    """Training and evaluation of one run read its snapshot: a later run growing the set (and a prune)
    must not change or break what they read, until the snapshot is older than the retention."""
    model, tok = tiny
    cfg = TargetsConfig(shard_size=2, max_train=10**6, max_validation=10**6, top_k=0, max_response_tokens=8)
    day1 = logged_day("2026-01-05", 8, turns=2)
    grown = pd.concat([day1.iloc[2:], logged_day("2026-01-06", 3, turns=2)])
    first = materialize_targets(select_for_scoring(day1, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False, snapshot_label="run-a")
    pinned = read_targets(first.snapshot)
    second = materialize_targets(select_for_scoring(grown, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False, snapshot_label="run-b")
    set_dir = Path(second.path)
    assert first.snapshot == str(set_dir / "snapshots" / "run-a.json")
    assert len(read_targets(set_dir)) == len(grown) and len(pinned) == len(day1)

    age(set_dir / "manifest.json", 7200)  # long re-planned: only the snapshot keeps run A's replaced shards
    assert sdpo(["targets", "prune"]) == 0
    pd.testing.assert_frame_equal(read_targets(first.snapshot), pinned)
    age(set_dir / "snapshots" / "run-a.json", 31 * 86400)  # past the 30-day retention
    report = prune_set(set_dir)
    assert "run-a.json" in report.removed and any(name.startswith("shard-") for name in report.removed)
    assert not Path(first.snapshot).exists() and len(read_targets(second.snapshot)) == len(grown)


def test_prune_keeps_the_newest_snapshot_and_those_registered_versions_name(tiny, tiny_model_dir, sdpo_home):
    model, tok = tiny
    cfg = TargetsConfig(shard_size=2, max_train=10**6, max_validation=10**6, top_k=0, max_response_tokens=8)
    rows = select_for_scoring(logged_day("2026-01-05", 4, turns=2), cfg)
    runs = [materialize_targets(rows, cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False, snapshot_label=label)
            for label in ("old-registered", "old", "latest")]
    set_dir = Path(runs[0].path)
    for age_days, run in zip((90, 60, 40), runs):  # all past the retention, the latest included
        age(run.snapshot, age_days * 86400)
    killed = set_dir / "snapshots" / ".latest.json.0123.tmp"  # a snapshot write that was killed
    killed.write_text("{")
    age(killed, 7200)
    assert prune_set(set_dir, registered=lambda: None, dry_run=True).removed == [".latest.json.0123.tmp"]  # registry down: keep
    elsewhere = f"/mnt/restored/targets/{set_dir.name}/snapshots/old-registered.json"  # the tag of a data root since moved
    report = prune_set(set_dir, registered=lambda: {elsewhere})
    assert sorted(report.removed) == [".latest.json.0123.tmp", "old.json"]  # the newest is what the latest run reads; the registered one is lineage
    assert len(read_targets(runs[2].snapshot)) == len(read_targets(runs[0].snapshot)) == len(rows)


def test_a_run_pins_its_plan_from_the_start_so_a_prune_meanwhile_keeps_its_shards(tiny, tiny_model_dir, sdpo_home):
    """Run A scores; run B grows the set; a prune (past the grace period) runs before A finishes."""
    from sdpo_platform.models import model_revision
    from sdpo_platform.targets import plan_target_set

    model, tok = tiny
    cfg = TargetsConfig(shard_size=2, max_train=10**6, max_validation=10**6, top_k=0, max_response_tokens=8)
    day1 = logged_day("2026-01-05", 8, turns=2)
    grown = pd.concat([day1.iloc[2:], logged_day("2026-01-06", 3, turns=2)])
    pruned = []

    def progress(p):
        if not pruned and p.extra.get("shards_done", 0) >= 4:
            set_dir = plan_target_set(select_for_scoring(grown, cfg), cfg, str(tiny_model_dir), model_revision(str(tiny_model_dir)))
            age(set_dir / "manifest.json", 7200)
            pruned.append(prune_set(set_dir).removed)

    run_a = materialize_targets(select_for_scoring(day1, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok,
                                show_bar=False, progress=progress, snapshot_label="run-a")
    assert pruned == [[]] and len(read_targets(run_a.snapshot)) == len(day1)


def test_a_killed_runs_pin_is_not_the_newest_and_a_bad_snapshot_stops_only_its_set(tiny, tiny_model_dir, sdpo_home, capsys):
    import json as json_module

    model, tok = tiny
    cfg = TargetsConfig(shard_size=2, max_train=10**6, max_validation=10**6, top_k=0, max_response_tokens=8)
    day1 = logged_day("2026-01-05", 8, turns=2)
    done = materialize_targets(select_for_scoring(day1, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False, snapshot_label="done")
    set_dir = Path(done.path)
    killed = json_module.loads(Path(done.snapshot).read_text()) | {"complete": False, "shards": []}
    (set_dir / "snapshots" / "killed.json").write_text(json_module.dumps(killed))  # pinned, then the run died
    for name in ("done.json", "killed.json"):
        age(set_dir / "snapshots" / name, 40 * 86400)
    age(set_dir / "snapshots" / "done.json", 41 * 86400)
    assert prune_set(set_dir).removed == ["killed.json"]  # the finished run's snapshot stays the newest
    assert len(read_targets(done.snapshot)) == len(day1)

    other = materialize_targets(select_for_scoring(day1, cfg.model_copy(update={"max_response_tokens": 6})), cfg.model_copy(update={"max_response_tokens": 6}),
                                str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    (Path(other.path) / ".shard-z.parquet.1.tmp").write_bytes(b"z")
    age(Path(other.path) / ".shard-z.parquet.1.tmp", 7200)
    (set_dir / "snapshots" / "broken.json").write_text("")  # a crash left an empty file
    (set_dir / "shard-orphan.parquet").write_bytes(b"o")
    age(set_dir / "manifest.json", 7200)
    assert sdpo(["targets", "prune"]) == 0
    captured = capsys.readouterr()
    assert "broken.json: unreadable snapshot" in captured.err
    assert (set_dir / "shard-orphan.parquet").exists()  # the unreadable snapshot may pin it
    assert f"{Path(other.path).name}: removed 1 file(s)" in captured.out  # the other set is still pruned


def test_registered_snapshots_reads_every_page(monkeypatch):
    from types import SimpleNamespace

    import sdpo_platform.registry as registry

    class Page(list):
        def __init__(self, items, token):
            super().__init__(items)
            self.token = token

    pages = {None: Page([SimpleNamespace(tags={"targets_snapshot": "a"})], "p2"),
             "p2": Page([SimpleNamespace(tags={}), SimpleNamespace(tags={"targets_snapshot": "b"})], None)}

    class Client:
        def search_model_versions(self, max_results, page_token=None):
            return pages[page_token]

    monkeypatch.setattr(registry, "MlflowClient", Client)
    monkeypatch.setattr(registry, "_ensure_configured", lambda: None)
    assert registry.registered_snapshots() == {"a", "b"}


def test_prune_keeps_expired_snapshots_when_the_registry_is_down(tiny, tiny_model_dir, sdpo_home, monkeypatch, capsys):
    model, tok = tiny
    cfg = TargetsConfig(shard_size=2, max_train=10**6, max_validation=10**6, top_k=0, max_response_tokens=8)
    rows = select_for_scoring(logged_day("2026-01-05", 4, turns=2), cfg)
    runs = [materialize_targets(rows, cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False, snapshot_label=label)
            for label in ("old", "latest")]
    age(runs[0].snapshot, 60 * 86400)

    def unreachable():
        raise ConnectionError("tracking server down")

    monkeypatch.setattr("sdpo_platform.registry.registered_snapshots", unreachable)
    assert sdpo(["targets", "prune"]) == 0
    captured = capsys.readouterr()
    assert "cannot read the model registry (ConnectionError: tracking server down)" in captured.err
    assert "removed 0 file(s)" in captured.out and Path(runs[0].snapshot).exists()
