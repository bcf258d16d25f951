"""The code location loads, with every lineage asset and one blocking check per asset."""

import dagster as dg

from assets import defs

LINEAGE = [
    "raw_interaction_logs", "conversations", "interactions", "hindsight_targets",
    "distilled_checkpoint", "evaluation", "registered_model",
]


def test_definitions_load_with_every_asset_and_check():
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert set(LINEAGE) | {"chat_log_inbox"} == keys
    graph = defs.resolve_asset_graph()
    checked = {k.asset_key.to_user_string() for k in graph.asset_check_keys}
    assert checked == set(LINEAGE)
    for check_key in graph.asset_check_keys:
        assert graph.get_check_spec(check_key).blocking, check_key


def test_lineage_job_and_dependencies():
    job = defs.resolve_job_def("sdpo_lineage")
    assert job is not None
    graph = defs.resolve_asset_graph()
    parents = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert parents["conversations"] == {"raw_interaction_logs"}
    assert parents["hindsight_targets"] == {"interactions"}
    assert parents["registered_model"] == {"hindsight_targets", "distilled_checkpoint", "evaluation"}


def test_inbox_sensor_requests_new_days_once(sdpo_home, tiny_model_dir):
    from assets.definitions import INGEST_JOB, build_definitions
    from assets.resources import SdpoSettings, Warehouse
    from tests.lineage_fixtures import FIXTURE_DAY, tiny_config, write_inbox

    write_inbox(sdpo_home / "inbox")
    settings = SdpoSettings(config_file=str(tiny_config(sdpo_home / "c.json", tiny_model_dir)), inbox=str(sdpo_home / "inbox"))
    defs = build_definitions(settings=settings, warehouse=Warehouse())
    sensor = defs.resolve_sensor_def("inbox_sensor")
    assert sensor.job_name == INGEST_JOB
    repository = defs.get_repository_def()
    resources = {"settings": settings, "warehouse": Warehouse()}
    with dg.instance_for_test() as instance, dg.build_sensor_context(instance=instance, resources=resources, repository_def=repository) as context:
        result = sensor.evaluate_tick(context)
        assert [r.partition_key for r in result.run_requests] == [FIXTURE_DAY]
        with dg.build_sensor_context(instance=instance, cursor=result.cursor, resources=resources, repository_def=repository) as again:
            assert sensor.evaluate_tick(again).run_requests == []  # nothing changed since


def test_rewritten_identical_file_requests_nothing(sdpo_home, tiny_model_dir):
    """A file rewritten with the same bytes on another day (new mtime) must not open an empty partition; while
    no data run has processed its stored rows, their own day is still asked for, and once one has, nothing is."""
    from assets.resources import SdpoSettings, Warehouse
    from assets.sensors import inbox_run_requests
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.gating import record_check
    from sdpo_platform.ingest import ingest_inbox
    from tests.lineage_fixtures import FIXTURE_DAY, arrived_on, tiny_config, write_inbox

    write_inbox(sdpo_home / "inbox")
    settings = SdpoSettings(config_file=str(tiny_config(sdpo_home / "c.json", tiny_model_dir)), inbox=str(sdpo_home / "inbox"))
    with Warehouse().connect() as con:
        ingest_inbox(con, settings.inbox_dir())  # stored, not yet cleaned
    for path in (sdpo_home / "inbox").iterdir():
        arrived_on(path, "2026-03-01")
    requests, _ = inbox_run_requests(settings, Warehouse(), cursor=None)
    assert [r.partition_key for r in requests] == [FIXTURE_DAY]

    with Warehouse().connect() as con:  # what a data run of that day does after ingesting: build it, record its checks
        build_conversations(con, settings.platform().cleaning, partitions=[FIXTURE_DAY])
        con.execute("UPDATE source_files SET ingested_at = now()::TIMESTAMP - INTERVAL 1 SECOND").fetchall()
        record_check(con, "conversations", FIXTURE_DAY, True)
    requests, _ = inbox_run_requests(settings, Warehouse(), cursor=None)
    assert requests == []


def test_a_large_drop_is_read_over_several_ticks_and_files_a_run_stored_early_are_not_lost(sdpo_home, tiny_model_dir):
    """With a byte budget below the inbox, each tick reads one file; the other keeps its place for the next
    tick. When a run started for the first file has already ingested the second (runs ingest the whole inbox)
    but processed only the first file's day, the next tick still asks for the second file's day."""
    from assets.resources import Warehouse
    from assets.sensors import inbox_run_requests
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.gating import record_check
    from sdpo_platform.ingest import ingest_inbox
    from tests.lineage_fixtures import arrived_on

    inbox, settings = two_days_one_file_per_tick(sdpo_home, tiny_model_dir)

    requests, cursor = inbox_run_requests(settings, Warehouse(), cursor=None)
    assert [r.partition_key for r in requests] == ["2026-02-01"]  # a/openai.jsonl only: one file per tick
    requests, cursor = inbox_run_requests(settings, Warehouse(), cursor)
    assert [r.partition_key for r in requests] == ["2026-02-01"]  # a/sharegpt.jsonl

    with Warehouse().connect() as con:  # the run for 2026-02-01 ingests the whole inbox, builds its own day
        ingest_inbox(con, inbox)
        build_conversations(con, settings.platform().cleaning, partitions=["2026-02-01"])
        con.execute("UPDATE source_files SET ingested_at = now()::TIMESTAMP - INTERVAL 1 SECOND").fetchall()
        record_check(con, "conversations", "2026-02-01", True)
    requests, cursor = inbox_run_requests(settings, Warehouse(), cursor)
    assert [r.partition_key for r in requests] == ["2026-02-02"]  # b/openai.jsonl: stored already, day not processed
    requests, cursor = inbox_run_requests(settings, Warehouse(), cursor)
    assert [r.partition_key for r in requests] == ["2026-02-02"]  # b/sharegpt.jsonl
    assert inbox_run_requests(settings, Warehouse(), cursor)[0] == []

    with Warehouse().connect() as con:  # the run for 2026-02-02 builds it; touching its files then asks for nothing
        build_conversations(con, settings.platform().cleaning, partitions=["2026-02-02"])
        record_check(con, "conversations", "2026-02-02", True)
    for path in (inbox / "b").iterdir():
        arrived_on(path, "2026-03-01")
    assert inbox_run_requests(settings, Warehouse(), cursor)[0] == []


def test_demo_drains_an_inbox_larger_than_one_tick_running_each_day_once(sdpo_home, tiny_model_dir):
    """`make demo` asks the sensor's question until no changed file is left: with a byte budget of one file
    per tick, both files' days run (one tick alone would run only the first file's day), each once, and a
    second drain runs nothing."""
    from assets.resources import Warehouse
    from assets.sensors import drain_inbox, inbox_run_requests
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.gating import record_check
    from sdpo_platform.ingest import ingest_inbox

    inbox, settings = two_days_one_file_per_tick(sdpo_home, tiny_model_dir)
    assert [r.partition_key for r in inbox_run_requests(settings, Warehouse(), cursor=None)[0]] == ["2026-02-01"]

    def run_partition(day: str):  # what the ingest_partition job does, in library calls
        with Warehouse().connect() as con:
            ingest_inbox(con, inbox)
            build_conversations(con, settings.platform().cleaning, partitions=[day])
            record_check(con, "conversations", day, True)

    assert drain_inbox(settings, Warehouse(), run_partition) == ["2026-02-01", "2026-02-02"]
    assert drain_inbox(settings, Warehouse(), run_partition) == []


def test_the_implicit_asset_job_runs_in_process():
    """The UI's asset-graph Materialize and `dagster asset materialize` launch the implicit asset job: with the
    default multiprocess executor its parallel check steps open the DuckDB warehouse at once and fail on its lock."""
    implicit = defs.resolve_implicit_global_asset_job_def()
    assert implicit.executor_def is dg.in_process_executor
    assert all(defs.resolve_job_def(name).executor_def is dg.in_process_executor
               for name in ("sdpo_lineage", "ingest_partition", "train_and_register"))


def two_days_one_file_per_tick(sdpo_home, tiny_model_dir):
    """An inbox of two folders (days 2026-02-01 and -02, two files each) and settings whose sensor byte
    budget lets one file through per tick."""
    import json

    from assets.resources import SdpoSettings
    from tests.lineage_fixtures import tiny_config, write_inbox

    inbox = sdpo_home / "inbox"
    write_inbox(inbox / "a", day="2026-02-01")
    write_inbox(inbox / "b", day="2026-02-02")
    config = json.loads(tiny_config(sdpo_home / "c.json", tiny_model_dir).read_text())
    config["ingest"] = {"sensor_bytes_per_tick": 1}
    (sdpo_home / "c.json").write_text(json.dumps(config))
    return inbox, SdpoSettings(config_file=str(sdpo_home / "c.json"), inbox=str(inbox))
