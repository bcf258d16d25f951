from sdpo_platform.gating import blocked_partitions, record_check
from sdpo_platform.warehouse import connect


def test_failed_partition_is_blocked_until_its_check_passes(tmp_path):
    con = connect(tmp_path / "w.duckdb")
    record_check(con, "conversations", "2026-01-02", True)
    record_check(con, "interactions", "2026-01-03", False, "unaccounted = 2")
    assert blocked_partitions(con) == ["2026-01-03"]
    record_check(con, "interactions", "2026-01-03", True)
    assert blocked_partitions(con) == []


def test_a_new_verdict_carries_its_own_time(tmp_path):
    """The inbox sensor compares checked_at with a file's ingestion: a re-check must move it forward."""
    con = connect(tmp_path / "w.duckdb")
    record_check(con, "conversations", "2026-01-02", True)
    con.execute("UPDATE partition_checks SET checked_at = TIMESTAMP '2020-01-01'").fetchall()
    record_check(con, "conversations", "2026-01-02", True)
    assert con.execute("SELECT checked_at > TIMESTAMP '2020-01-01' FROM partition_checks").fetchone() == (True,)
