"""The suite's own set-up: tests that use SmolLM2 share one xdist worker (tests/conftest.py).

pytest 9.2 with pytest-xdist 3.8 silently dropped the groups (xdist writes a node attribute pytest 9.2 no
longer reads), and a hook that adds the mark after xdist's has no effect either: SmolLM2 was then loaded and
exported on both workers, minutes of CI. This test fails when that happens again.
"""

from __future__ import annotations

import pytest


def test_smollm2_tests_are_grouped_on_one_worker(request):
    if not hasattr(request.config, "workerinput"):
        pytest.skip("not on an xdist worker (README command 2 runs -n 2 --dist loadgroup)")
    if not request.config.getvalue("loadgroup"):
        pytest.skip("the workers do not group (--dist other than loadgroup)")
    smollm2_node = "test_smollm2_tests_are_grouped_on_one_worker"  # the name holds 'smollm2': it is grouped
    assert smollm2_node in request.node.nodeid
    assert request.node.nodeid.endswith("@smollm2"), (
        f"{request.node.nodeid}: the xdist group was not applied; SmolLM2 tests run on both workers"
    )
