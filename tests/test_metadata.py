"""What the Dagster UI shows of user text: one table row per example, no markup from the logs."""

from assets.metadata import examples_table


def test_example_cells_stay_on_their_row_and_render_no_markup():
    table = examples_table([{"preview": "a\rsecond line\u2028third | <img src=x onerror=alert(1)>", "score": 0.556337462392444,
                             "detail": None}]).value
    header, rule, row = table.split("\n")  # \r or U+2028 used to end the row in the middle of a cell
    assert row == "| a second line third \\| &lt;img src=x onerror=alert(1)> | 0.5563 |  |"
