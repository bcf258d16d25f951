from sdpo_platform.gating import blocked_partitions, record_check
from sdpo_platform.warehouse import connect


def test_failed_partition_is_blocked_until_its_check_passes(tmp_path):
    con = connect(tmp_path / "w.duckdb")
    record_check(con, "conversations", "2026-01-02", True)
    record_check(con, "interactions", "2026-01-03", False, "unaccounted = 2")
    assert blocked_partitions(con) == ["2026-01-03"]
    record_check(con, "interactions", "2026-01-03", True)
    assert blocked_partitions(con) == []
