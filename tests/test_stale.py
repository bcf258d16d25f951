"""A changed file takes conversations away; the days whose duplicates pointed at them are rebuilt too."""

from __future__ import annotations

import json

from sdpo_platform.config import PlatformConfig
from sdpo_platform.pipeline import ingest_and_clean
from sdpo_platform.stale import stale_partitions
from sdpo_platform.warehouse import connect, stats

DAY1, DAY2 = "2024-01-01", "2024-01-02"


def no_model_config() -> PlatformConfig:
    """The judge of triples runs without the model signal: not under test here, and it would load a model."""
    return PlatformConfig.model_validate({"informativeness": {"use_model": False}})


def chat(source_id: str, day: str, tag: str, followup: str | None = None) -> dict:
    return {"conversation_hash": source_id, "timestamp": f"{day}T10:00:00Z", "conversation": [
        {"role": "user", "content": f"Question {tag}: can you explain how the water cycle works for my class?"},
        {"role": "assistant", "content": f"Answer {tag}: water evaporates, forms clouds and then falls as rain."},
        {"role": "user", "content": followup or f"Follow up {tag}: that is too long, please make it shorter for the kids."}]}


def write(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def two_days(directory):
    """Day 2 holds a `duplicate_id` of x's first record, a `duplicate` of its second and a near-duplicate of its third."""
    x, y = directory / "x.jsonl", directory / "y.jsonl"
    write(x, [chat("dup", DAY1, "alpha"), chat("other", DAY1, "beta"), chat("near", DAY1, "eps")])
    write(y, [chat("dup", DAY2, "gamma"), chat("copy", DAY2, "beta"), chat("near2", DAY2, "eps", "Please shorten it for a class of six year olds.")])
    return x, y


def day2_verdicts(con) -> dict:
    kept = con.execute("SELECT source_id, coalesce(near_duplicate_of, 'kept') FROM conversations WHERE partition_date = ?", [DAY2]).fetchall()
    quarantined = con.execute("SELECT source_file, reason FROM quarantine WHERE stage = 'conversations' AND partition_date = ?", [DAY2]).fetchall()
    return {"kept": dict(kept), "quarantined": sorted(reason for _, reason in quarantined)}


def test_a_changed_file_rebuilds_the_days_whose_duplicates_pointed_at_its_old_conversations(sdpo_home, tmp_path):
    x, y = two_days(tmp_path)
    cfg = no_model_config()
    with connect() as con:
        ingest_and_clean(con, [x, y], cfg)
        before = day2_verdicts(con)
        assert before["quarantined"] == ["duplicate", "duplicate_id"] and before["kept"]["near2"] != "kept"

        write(x, [chat("new", DAY1, "delta")])  # x no longer holds what day 2 repeated
        outcome = ingest_and_clean(con, [x], cfg)

        assert outcome["partitions"] == [DAY1] and outcome["partitions_stale"] == [DAY2]
        assert set(outcome["checks"]) == {DAY1, DAY2}
        assert day2_verdicts(con) == {"kept": {"dup": "kept", "copy": "kept", "near2": "kept"}, "quarantined": []}
        assert stale_partitions(con) == {}
        counts = stats(con)
        assert counts["raw_records"] == 4 == counts["conversations_kept"] + counts["quarantined"]


def test_the_inbox_sensor_asks_for_a_stale_day_once_and_not_after_its_rebuild(sdpo_home, tmp_path):
    from assets.resources import SdpoSettings, Warehouse
    from assets.sensors import inbox_run_requests
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.gating import record_check
    from sdpo_platform.ingest import ingest_files

    inbox = sdpo_home / "inbox"
    inbox.mkdir()
    x, _ = two_days(inbox)
    settings, cfg = SdpoSettings(inbox=str(inbox)), no_model_config()
    with connect() as con:
        ingest_and_clean(con, sorted(inbox.iterdir()), cfg)
    _, cursor = inbox_run_requests(settings, Warehouse(), None)

    write(x, [chat("new", DAY1, "delta")])
    with connect() as con:  # what the run for day 1 does: ingest the inbox, rebuild and check its own day only
        ingest_files(con, [x])
        build_conversations(con, cfg.cleaning, partitions=[DAY1])
        record_check(con, "conversations", DAY1, True)
    requests, cursor = inbox_run_requests(settings, Warehouse(), cursor)

    assert [(r.partition_key, r.run_key.split(":")[1]) for r in requests] == [(DAY2, "stale")]
    assert inbox_run_requests(settings, Warehouse(), cursor)[0][0].run_key == requests[0].run_key  # same key: asked once
    with connect() as con:
        build_conversations(con, cfg.cleaning, partitions=[DAY2])
        assert day2_verdicts(con)["quarantined"] == []
    assert inbox_run_requests(settings, Warehouse(), cursor)[0] == []


def test_a_day_whose_raw_records_a_changed_file_took_away_is_stale_until_rebuilt(sdpo_home):
    """Another day's run (a backfill, a queued run) re-ingests a changed file first and rebuilds its own day only:
    the days the file's old rows lived in keep conversations (day 5) or record-level quarantine rows (day 4) built
    from raw records that are gone. They are stale, the sensor asks for them, and a rebuild clears them."""
    import os

    from assets.resources import SdpoSettings, Warehouse
    from assets.sensors import inbox_run_requests
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.ingest import ingest_files

    day4, day5, day7 = "2026-01-04", "2026-01-05", "2026-01-07"
    inbox = sdpo_home / "inbox"
    inbox.mkdir()
    a, b = inbox / "a.jsonl", inbox / "b.jsonl"
    write(a, [chat("one", day5, "alpha"), chat("two", day5, "beta")])
    b.write_text("not json at all\n")
    os.utime(b, (1767528000, 1767528000))  # 2026-01-04 12:00 UTC: the invalid line's day
    settings, cfg = SdpoSettings(inbox=str(inbox)), no_model_config()
    with connect() as con:
        ingest_and_clean(con, [a, b], cfg)
        assert stale_partitions(con) == {}
    _, cursor = inbox_run_requests(settings, Warehouse(), None)

    write(a, [chat("one", day7, "alpha v2")])  # both files change; their records now fall on day 7
    write(b, [chat("three", day7, "gamma")])
    with connect() as con:  # the other run: ingest the inbox, build and check day 7 only
        ingest_files(con, [a, b])
        build_conversations(con, cfg.cleaning, partitions=[day7])
        stale = stale_partitions(con)
        assert sorted(stale) == [day4, day5] and stale_partitions(con) == stale  # stable digests: run keys
    requests, _ = inbox_run_requests(settings, Warehouse(), cursor)
    assert {(r.partition_key, r.run_key) for r in requests} >= {(day, f"{day}:stale:{digest}") for day, digest in stale.items()}

    with connect() as con:
        build_conversations(con, cfg.cleaning, partitions=[day4, day5])
        # day 7 was built while day 5 still held "one": its new "one" is a duplicate_id of it, a link that now
        # dangles (the second round `sdpo ingest` runs, and the sensor's next tick asks for)
        assert list(stale_partitions(con)) == [day7]
        build_conversations(con, cfg.cleaning, partitions=[day7])
        assert stale_partitions(con) == {}
        assert con.execute("SELECT count(*) FROM conversations WHERE partition_date <= ?::DATE", [day5]).fetchall() == [(0,)]


def test_sdpo_ingest_with_nothing_new_still_rebuilds_days_an_earlier_run_left_stale(sdpo_home, tmp_path):
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.ingest import ingest_files

    x, y = two_days(tmp_path)
    cfg = no_model_config()
    with connect() as con:
        ingest_and_clean(con, [x, y], cfg)
        write(x, [chat("new", DAY1, "delta")])
        ingest_files(con, [x])  # another run stored x and rebuilt day 1 only
        build_conversations(con, cfg.cleaning, partitions=[DAY1])
        assert DAY2 in stale_partitions(con)

        outcome = ingest_and_clean(con, [x, y], cfg)  # nothing new to ingest

        assert outcome["partitions"] == [] and outcome["partitions_stale"] == [DAY2]
        assert stale_partitions(con) == {} and day2_verdicts(con)["quarantined"] == []
