"""A backfill of the `ingest_partition` job over several daily partitions, started the way a user starts one
from the shell (`dagster job backfill ... --from DAY --to DAY`): the warehouse gets exactly the rows of
those days, and running the same backfill again adds nothing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.lineage_fixtures import arrived_on, tiny_config, write_inbox

REPO = Path(__file__).resolve().parents[1]
DAYS = ["2026-01-05", "2026-01-06", "2026-01-07"]  # the backfilled range
LATER_DAY = "2026-01-08"  # has logs in the inbox too, but is outside the range

# The test instance launches each submitted run at once (no queue) and runs it synchronously inside the CLI
# process, so the command returns when the runs are done; a real deployment queues them for the daemon
# that `dagster dev` starts, and the UI shows the backfill's progress.
SYNC_INSTANCE = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster._core.launcher.sync_in_memory_run_launcher
  class: SyncInMemoryRunLauncher
telemetry:
  enabled: false
"""


def _write_day(inbox: Path, day: str) -> dict:
    """The lineage fixtures for `day`, with ShareGPT ids made unique per day (the same id on another day with
    other content would rightly be quarantined as duplicate_id, which is not what this test is about)."""
    expected = write_inbox(inbox, day)
    sharegpt = inbox / "sharegpt.jsonl"
    sharegpt.write_text(sharegpt.read_text().replace('"id": "sg', f'"id": "{day}-sg'))
    arrived_on(sharegpt, day)
    return expected


def _dagster_cli() -> str:
    found = shutil.which("dagster", path=str(Path(sys.executable).parent)) or shutil.which("dagster")
    if found is None:
        pytest.skip("the dagster CLI is not installed")
    return found


def _backfill(env: dict, first: str, last: str) -> subprocess.CompletedProcess:
    command = [_dagster_cli(), "job", "backfill", "-f", str(REPO / "assets" / "definitions.py"),
               "-j", "ingest_partition", "--from", first, "--to", last, "--noprompt"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _snapshot(warehouse: Path) -> dict:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        def per_day(table: str, condition: str = "true") -> dict:
            return dict(con.execute(
                f"SELECT partition_date::VARCHAR, count(*) FROM {table} WHERE {condition} GROUP BY 1 ORDER BY 1").fetchall())

        return {
            "raw": per_day("raw_records"),
            "conversations": per_day("conversations"),
            "interactions": per_day("interactions"),
            "quarantined": per_day("quarantine", "stage = 'conversations' AND level = 'record'"),
            "conversation_ids": sorted(row[0] for row in con.execute("SELECT conversation_id FROM conversations").fetchall()),
            "interaction_ids": sorted(row[0] for row in con.execute("SELECT interaction_id FROM interactions").fetchall()),
        }
    finally:
        con.close()


def _runs(dagster_home: Path) -> list:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return instance.get_runs()


def test_cli_backfill_over_three_days_then_again(sdpo_home, tiny_model_dir, tmp_path):
    expected = {day: _write_day(sdpo_home / "inbox" / day, day) for day in [*DAYS, LATER_DAY]}
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(SYNC_INSTANCE)
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "SDPO_HOME": str(sdpo_home), "HF_HUB_OFFLINE": "1",
           "SDPO_CONFIG": str(tiny_config(sdpo_home / "config.json", tiny_model_dir)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    _backfill(env, DAYS[0], DAYS[-1])
    runs = _runs(dagster_home)
    assert sorted(run.tags.get("dagster/partition") for run in runs) == DAYS  # one run per day of the range
    assert all(run.is_success for run in runs), [(run.tags.get("dagster/partition"), run.status) for run in runs]

    first = _snapshot(sdpo_home / "warehouse.duckdb")
    good = {day: counts["good_conversations"] for day, counts in expected.items()}
    # ingestion is inbox-wide (any day's run ingests every new file), cleaning and triples are per day:
    assert first["raw"] == {day: counts["raw_records"] for day, counts in expected.items()}
    assert first["conversations"] == {day: good[day] for day in DAYS}  # exactly the backfilled days
    assert first["interactions"] == {day: good[day] for day in DAYS}  # one follow-up per fixture conversation
    assert first["quarantined"] == {day: expected[day]["raw_records"] - good[day] for day in DAYS}
    assert LATER_DAY not in first["conversations"]

    _backfill(env, DAYS[0], DAYS[-1])  # the same backfill again: every day is rebuilt ...
    assert len(_runs(dagster_home)) == 2 * len(DAYS)
    assert _snapshot(sdpo_home / "warehouse.duckdb") == first  # ... and nothing is added or changed
