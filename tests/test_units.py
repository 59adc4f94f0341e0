"""prune2deploy/units.py: the one number formatter behind the console, report.html and the sweep page."""

from __future__ import annotations

from prune2deploy.cli.render import count
from prune2deploy.profiling.report_html import _num
from prune2deploy.sweep.report import _fmt
from prune2deploy.units import number


def test_number_reads_the_same_everywhere_but_the_dash():
    values = [None, True, False, 1234567, 0.000123456, 12.345678, "a<b"]
    assert [number(v) for v in values] == ["—", "yes", "no", "1,234,567", "0.0001235", "12.35", "a<b"]
    assert [_fmt(v) for v in values] == ["–", *[number(v) for v in values[1:]]]
    assert [_num(v) for v in values] == [*[number(v) for v in values[:-1]], "a&lt;b"]  # escaped for HTML


def test_count_has_one_definition():
    from prune2deploy import units

    assert count is units.count and count(45_600) == "45.60k"
