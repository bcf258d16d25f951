"""Progress lines: one per tenth of the work reached and one at the end, with scaled units."""

from sdpo_platform.progress import fraction_logger


def test_fraction_logger_reports_each_tenth_once_and_the_end():
    lines = []
    progress = fraction_logger(lines.append, "conversations", "records")
    for done in [*range(0, 1000, 7), 1000]:  # 143 uneven steps, then the end
        progress(done, 1000)
    counts = [line.split(", ")[0] for line in lines]
    assert counts[0] == "conversations: 0/1,000 records (0%)"
    assert counts[-1] == "conversations: 1,000/1,000 records (100%)"
    assert len(lines) == 11  # 0 %, the first call past each further tenth, and the end
    assert all("records/s, ETA" in line for line in lines)


def test_scaled_units_show_tenths():
    lines = []
    fraction_logger(lines.append, "ingest", "MB", 1e6)(2_345_678, 4_000_000)
    assert lines[0].startswith("ingest: 2.3/4.0 MB (59%), ")
