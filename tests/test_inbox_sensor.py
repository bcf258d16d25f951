"""The inbox sensor on awkward inboxes: days outside the partitions, and files read with the warehouse closed."""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext

import dagster as dg

from assets.definitions import build_definitions
from assets.resources import SdpoSettings, Warehouse
from assets.sensors import drain_inbox, inbox_run_requests

DAY = "2026-01-05"


def openai_chat(i: int, created: str) -> dict:
    return {"created": created, "messages": [
        {"role": "user", "content": f"Question {i}: how do I cook rice properly at home?"},
        {"role": "assistant", "content": f"Rinse the rice, then simmer it for about {i + 10} minutes."},
        {"role": "user", "content": "That is too long, please make it shorter."}]}


def write(path, stamps: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(openai_chat(i, ts)) + "\n" for i, ts in enumerate(stamps)))


def tick(defs, settings, warehouse, cursor=None, instance=None):
    resources = {"settings": settings, "warehouse": warehouse}
    with (dg.instance_for_test() if instance is None else nullcontext(instance)) as instance:
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources,
                                     repository_def=defs.get_repository_def()) as context:
            return defs.resolve_sensor_def("inbox_sensor").evaluate_tick(context)


def test_days_outside_the_partitions_are_reported_not_requested(sdpo_home):
    """One record before SDPO_PARTITION_START and one from a future clock must not fail the tick (an unknown
    partition key fails every request of it): the valid day is requested, the others are reported with a way in."""
    inbox = sdpo_home / "inbox"
    write(inbox / "a.jsonl", [f"{DAY}T10:00:00Z", "2019-12-31T12:00:00Z", "2099-06-01T00:00:00Z"])
    settings, warehouse = SdpoSettings(inbox=str(inbox)), Warehouse()
    defs = build_definitions(settings=settings, warehouse=warehouse)

    result = tick(defs, settings, warehouse)
    assert [r.partition_key for r in result.run_requests] == [DAY]

    warned: list[str] = []
    requests, _ = inbox_run_requests(settings, warehouse, None, warned.append)
    assert [r.partition_key for r in requests] == [DAY]
    assert len(warned) == 1 and "2019-12-31" in warned[0] and "SDPO_PARTITION_START" in warned[0]
    assert "2099-06-01" in warned[0] and "clock" in warned[0]
    assert drain_inbox(settings, warehouse, lambda day: None, warned.append) == [DAY]

    write(inbox / "b.jsonl", ["2019-06-01T10:00:00Z"])  # only outside days: the skip reason says why
    skipped = tick(defs, settings, warehouse, result.cursor)
    assert skipped.run_requests == [] and "2019-06-01" in skipped.skip_message and "SDPO_PARTITION_START" in skipped.skip_message


class SpyWarehouse(Warehouse):
    """A warehouse that knows whether one of its connections is open."""

    @contextmanager
    def connect(self):
        with super().connect() as con:
            _OPEN.append(con)
            try:
                yield con
            finally:
                _OPEN.remove(con)


_OPEN: list = []


def test_files_are_hashed_and_read_with_no_warehouse_connection_open(sdpo_home, monkeypatch):
    """Reading a tick's files (up to `ingest.sensor_bytes_per_tick`) takes long; a run that opens the warehouse
    meanwhile fails on DuckDB's lock if the sensor holds it. Both a stored file (hashed) and a new one (read)."""
    import sdpo_platform.ingest
    from sdpo_platform.ingest import ingest_files

    inbox = sdpo_home / "inbox"
    write(inbox / "stored.jsonl", [f"{DAY}T10:00:00Z"])
    with Warehouse().connect() as con:
        ingest_files(con, [inbox / "stored.jsonl"])
    write(inbox / "new.jsonl", ["2026-01-06T10:00:00Z"])

    calls = []

    def closed(name, real):
        def check(*args, **kwargs):
            calls.append((name, len(_OPEN)))
            return real(*args, **kwargs)
        return check

    monkeypatch.setattr(sdpo_platform.ingest, "file_hash", closed("file_hash", sdpo_platform.ingest.file_hash))
    record_days = closed("record_days", sdpo_platform.ingest.record_days)
    monkeypatch.setattr(sdpo_platform.ingest, "record_days", record_days)
    warehouse = SpyWarehouse()
    requests, _ = inbox_run_requests(SdpoSettings(inbox=str(inbox)), warehouse, None)

    assert sorted(r.partition_key for r in requests) == [DAY, "2026-01-06"]  # stored but never processed, and new
    assert {name for name, _ in calls} == {"file_hash", "record_days"}
    assert all(open_connections == 0 for _, open_connections in calls), calls


def test_a_missing_inbox_or_a_busy_warehouse_is_said_not_read_as_nothing_new(sdpo_home, monkeypatch):
    import duckdb

    notes = []
    missing = SdpoSettings(inbox=str(sdpo_home / "no-such-inbox"))
    assert inbox_run_requests(missing, Warehouse(), None, notes.append)[0] == []
    assert notes and "does not exist" in notes[0]

    inbox = sdpo_home / "inbox"
    write(inbox / "new.jsonl", [f"{DAY}T10:00:00Z"])
    with Warehouse().connect():
        pass  # the warehouse exists

    def locked(self):
        raise duckdb.IOException("Could not set lock on file")

    monkeypatch.setattr(Warehouse, "connect", locked)
    notes.clear()
    requests, cursor = inbox_run_requests(SdpoSettings(inbox=str(inbox)), Warehouse(), None, notes.append)
    assert requests == [] and cursor == "{}"  # the file stays new for the next tick
    assert notes and "busy" in notes[0] and "1 new or changed file(s)" in notes[0]


def test_a_day_whose_run_waits_in_the_queue_is_not_requested_again(sdpo_home):
    """A drop larger than a tick's share is read over several ticks; runs queue one at a time (dagster.yaml), and a
    queued run ingests every inbox file when it starts. A second request for its day would only rebuild the day
    again, once per tick; a day whose run has started may have ingested already, so it is requested."""
    from dagster._core.test_utils import create_run_for_test

    from assets.definitions import INGEST_JOB

    inbox = sdpo_home / "inbox"
    write(inbox / "a.jsonl", [f"{DAY}T10:00:00Z"])
    write(inbox / "b.jsonl", [f"{DAY}T11:00:00Z", "2026-01-06T09:00:00Z"])
    settings, warehouse = SdpoSettings(inbox=str(inbox)), Warehouse()
    defs = build_definitions(settings=settings, warehouse=warehouse)
    with dg.instance_for_test() as instance:
        first = tick(defs, settings, warehouse, instance=instance)
        assert [r.partition_key for r in first.run_requests] == [DAY, "2026-01-06"]
        queued = create_run_for_test(instance, job_name=INGEST_JOB, tags={"dagster/partition": DAY},  # waiting like QUEUED
                                     status=dg.DagsterRunStatus.NOT_STARTED)  # (a test run cannot be QUEUED: no origin)
        write(inbox / "c.jsonl", [f"{DAY}T12:00:00Z", "2026-01-07T09:00:00Z"])  # the next tick's share
        second = tick(defs, settings, warehouse, first.cursor, instance=instance)
        assert [r.partition_key for r in second.run_requests] == ["2026-01-07"]

        instance.report_run_canceled(queued)  # it never ran: its day is asked for again, with no new file
        third = tick(defs, settings, warehouse, second.cursor, instance=instance)
        assert [r.partition_key for r in third.run_requests] == [DAY, "2026-01-07"]
        assert third.run_requests[1].run_key == second.run_requests[0].run_key  # the same request again: Dagster runs it once
