"""The report's deployable outputs: gguf/ per file (type, size, architecture, padding, llama.cpp's check or why
not) and hf/'s padding share, in the schema and on the HTML page."""

from __future__ import annotations

import pytest

from prune2deploy.errors import BadInputError
from prune2deploy.profiling.report import render_html, validate_report
from prune2deploy.profiling.report_outputs import output_tables
from tests.profiling import report_samples


def _gguf_file(kind: str, arch: str, size: int, check: dict, padded: int = 0) -> dict:
    return {
        "file": f"model-{kind}.gguf",
        "arch": arch,
        "bytes": size,
        "params": 1000,
        "per_layer": [[9, 3, 1536], [9, 3, 512]],
        "padded_mlp": {f"model.layers.{i}.mlp": [500, 512] for i in range(padded)},  # as gguf.py writes it
        "padding_params": 3 * 576 * 16 * padded,
        "check": check,
    }


def _report() -> dict:
    report = report_samples.minimal_report()
    report["gguf"] = {
        "written": True,
        "path": "gguf",
        "arch_reason": "llama where the written per-layer widths are uniform; deci where they differ",
        "check_input": "the first 48 tokens of the bundled evaluation text",
        "files": {
            "f32": _gguf_file(
                "f32", "deci", 381_500_000,
                {"checked": True, "max_rel_diff": 2.3e-5, "bound": 1e-4, "passed": True, "top1_agreement": 1.0,
                 "kl": 0.0},
            ),
            "q8_0": _gguf_file(
                "q8_0", "deci", 102_700_000,
                {"checked": True, "max_rel_diff": 0.3, "top1_agreement": 0.917, "kl": 0.031,
                 "approximate": "q8_0 quantization: information"},
                padded=2,
            ),
            "q4_1": _gguf_file("q4_1", "deci", 73_600_000, {"checked": False, "reason": "llama-cpp-python is missing"}),
        },
    }  # fmt: skip
    report["hf"] = {
        "written": True,
        "path": "hf",
        "check": {"max_rel_diff": 1.3e-5, "greedy_tokens_equal": True},
        "padding": {
            "shape": {"num_heads": 9, "kv_heads": 3, "intermediate": 1536},
            "params_added": 39_600_000,
            "params_share": 0.294,
            "flops_share": 0.294,
        },
    }
    report["genai"] = {"written": False, "reason": "--no-genai"}
    return report


def test_the_outputs_validate_and_read_as_rows():
    report = _report()
    validate_report(report)
    tables = {t.folder: t for t in output_tables(report)}
    assert list(tables) == ["genai/", "hf/", "gguf/"]
    rows = {row[1]: row for row in tables["gguf/"].rows}
    assert rows["f32"][2:6] == [381.5, "deci", 0, 0]
    assert rows["f32"][6] == "PASSED: max rel. error 2.3e-05 (bound 0.0001)"
    assert rows["q8_0"][4:6] == [2, 2 * 3 * 576 * 16]
    assert rows["q8_0"][6] == "q8_0 (approximate): top-1 91.7%, KL 0.031"  # numbers, never a verdict
    assert rows["q4_1"][6] == "not checked: llama-cpp-python is missing"
    assert "29.4% of the checkpoint's parameters" in tables["hf/"].notes[0]
    assert "9 heads / 3 kv heads / 1536 MLP neurons" in tables["hf/"].notes[0]
    assert tables["hf/"].rows == [["yes", "—", "max rel. error 1.30e-05, greedy tokens equal: yes"]]
    assert tables["genai/"].notes == ["not written: --no-genai"]


def test_the_page_shows_the_outputs_section_instead_of_raw_json():
    page = render_html(_report())
    outputs = page[page.index('<section id="outputs">') :]
    outputs = outputs[: outputs.index("</section>")]
    for text in ("model-q8_0.gguf", "deci", "PASSED: max rel. error 2.3e-05", "top-1 91.7%", "29.4%",
                 "not checked: llama-cpp-python is missing", "not written: --no-genai"):  # fmt: skip
        assert text in outputs, text
    assert "PASSED" not in outputs.split("model-q8_0.gguf")[1].split("</tr>")[0]
    assert '<section id="more">' not in page  # genai/hf/gguf are known sections now, not leftovers


def test_a_report_without_outputs_has_no_outputs_section():
    page = render_html(report_samples.minimal_report())
    assert 'id="outputs"' not in page
    assert output_tables(report_samples.minimal_report()) == []


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("gguf", "files", "q8_0", "arch"), "qwen2", "arch"),
        (("gguf", "files", "f32", "bytes"), 0, "bytes"),
        (("hf", "padding", "params_share"), 1.5, "params_share"),
        (("gguf", "written"), "yes", "written"),
        (("gguf", "files", "q8_0", "padded_mlp"), ["model.layers.0.mlp"], "padded_mlp"),
    ],
)
def test_the_schema_refuses_a_wrong_output_field(path, value, where):
    report = _report()
    node = report
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(BadInputError, match=where):
        validate_report(report)
