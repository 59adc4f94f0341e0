"""cli/render.py: counts, percentages and plain-text tables."""

from __future__ import annotations

from prune2deploy.cli.render import count, indent, percent, table


def test_counts_have_units():
    assert [count(n) for n in (812, 45_600, 1_234_567, 2.5e9, -3_000)] == ["812", "45.60k", "1.23M", "2.50G", "-3.00k"]


def test_percent_keeps_a_decimal_only_where_it_matters():
    assert [percent(f) for f in (0.25, 0.5, 2 / 9, 1 / 3, 0.0)] == ["25%", "50%", "22.2%", "33.3%", "0%"]


def test_table_aligns_columns_under_a_dashed_header():
    text = table([["a", 1], ["bbb", 22]], ["name", "n"])
    assert text.splitlines() == ["name  n ", "----  --", "a     1 ", "bbb   22"]
    assert indent("x\ny") == "    x\n    y"
