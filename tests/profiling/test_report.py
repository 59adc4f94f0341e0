"""report.json schema, HTML rendering, atomic writing, and the page as a browser shows it."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from prune2deploy.errors import BadInputError, ConfigError
from prune2deploy.profiling.report import (
    latency_sections,
    render_html,
    report_schema,
    validate_report,
    write_report,
)
from tests.profiling import report_samples

PLOT_IDS = ["plot-per-layer", "plot-latency", "plot-speedup", "plot-predictions"]
CHROMIUM = Path("/usr/bin/chromium")

MINIMAL = report_samples.MINIMAL_REPORT


@pytest.fixture
def full_report() -> dict:
    return report_samples.full_report()


class _Images(HTMLParser):
    """Collects every <img>'s attributes and every section id."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, dict[str, str]] = {}
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images[values.get("id", "")] = values
        elif tag == "section":
            self.sections.append(values["id"])


def _parse(page: str) -> _Images:
    parser = _Images()
    parser.feed(page)
    return parser


def _png_size(src: str) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix) :])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- schema ----------------------------------------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(report_schema())


def test_full_and_minimal_reports_are_valid(full_report):
    validate_report(full_report)
    validate_report(MINIMAL)


def test_prediction_and_verification_keys_are_in_the_schema(full_report):
    """The prediction row schema (profiling/prediction.py) and Verification.as_dict's precision/bound/floors."""
    from prune2deploy.verify.result import Verification

    props = report_schema()["properties"]
    row_keys = set(props["predictions"]["items"]["properties"])
    assert {"compiled_ms", "reference_ms", "speedup", "ideal_speedup", "lower_bound_ms", "lower_bound_speedup",
            "fusion_level", "fusion_speedup", "fused_ops", "gflops", "source"} <= row_keys  # fmt: skip
    assert not row_keys & {"predicted_ms", "latency_ms", "reference_predicted_ms", "predicted_speedup"}
    ver = Verification(exact=True, tolerance=1e-4, precision="fp32", floors={"logits": 3e-6})
    ver.outputs = {"logits": {"max_abs": 1e-6, "max_rel": 2e-6, "scale": 1.0, "cosine": 1.0}}
    full_report["verification"] = ver.as_dict()
    assert set(ver.as_dict()) <= set(props["verification"]["properties"])
    full_report["predictions"][0].update(
        ideal_speedup=1.67, lower_bound_speedup=None, fusion_level="reference fused here", fusion_speedup=1.84,
        fused_ops={"MultiHeadAttention": 2}, source="graph", kernels=120, ms_by_group={"mlp": 0.3},
    )  # fmt: skip
    validate_report(full_report)
    full_report["predictions"][0]["fusion_level"] = "fused"
    with pytest.raises(BadInputError, match=r"predictions\[0\]\.fusion_level"):
        validate_report(full_report)


def test_compare_models_rows_fit_the_latency_schema(full_report):
    full_report["latency"][0].update(kind="latency", std_ms=0.1, min_ms=3.0, rel_ci=0.01, stop_reason="stable")
    validate_report(full_report)


@pytest.mark.parametrize(
    ("path", "breakage", "message"),
    [
        (
            "$.latency[1].median_ms",
            lambda r: r["latency"][1].update(median_ms="fast"),
            "'fast' is not of type",
        ),
        ("$.input.kind", lambda r: r["input"].update(kind="pt"), "'pt' is not one of"),
        ("$.passes[2]", lambda r: r["passes"][2].pop("exact"), "'exact' is a required property"),
        ("$.input.sha256", lambda r: r["input"].update(sha256="XYZ"), "does not match"),
        ("$.schema_version", lambda r: r.update(schema_version=2), "1 was expected"),
        ("$", lambda r: r.pop("tool"), "'tool' is a required property"),
        ("$.predictions[0].measured_ms", lambda r: r["predictions"][0].update(measured_ms=-1.0), "minimum"),
    ],
)
def test_broken_reports_name_the_json_path(full_report, path, breakage, message):
    breakage(full_report)
    with pytest.raises(BadInputError) as caught:
        validate_report(full_report)
    text = str(caught.value)
    assert f"at {path}:" in text
    assert message in text


# --- HTML --------------------------------------------------------------------------------------------------


def test_html_has_every_section_and_decodable_plots(full_report):
    page = render_html(full_report)
    parsed = _parse(page)
    assert parsed.sections == [
        "summary",
        "passes",
        "groups",
        "verification",
        "quality",
        "per-layer",
        "latency",
        "speedup",
        "predictions",
        "ops",
        "sparsity",
        "options",
    ]
    assert list(parsed.images) == PLOT_IDS
    for attrs in parsed.images.values():
        assert len(attrs["alt"]) > 20
        width, height = _png_size(attrs["src"])
        assert width >= 400 and height >= 200
    assert "http://" not in page and "https://" not in page  # self-contained
    # Numbers from the report appear as people read them.
    assert "1,000,000 → 600,000" in page and "-40.0%" in page
    assert "Best measured speedup: <strong>1.50×</strong>" in page
    assert page.count('<span class="bad">approximate</span>') == 1  # the regroup-gqa pass
    assert "dense (before the masks)" in page and "0.0123" in page and "0.9375" in page  # the quality table


def test_html_escapes_report_text(full_report):
    full_report["per_layer"][0]["layer"] = "<script>alert(1)</script>"
    full_report["groups"]["blocked"][0]["reason"] = 'axis "C" & <unknown>'
    page = render_html(full_report)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "axis &quot;C&quot; &amp; &lt;unknown&gt;" in page


def test_ops_section_compares_models_per_op_type(full_report):
    page = render_html(full_report)
    section = page[page.index('<section id="ops">') :]
    section = section[: section.index("</section>")]
    # MatMul: 3.0 ms reference vs 1.5 ms compiled; Softmax 1.0 vs 1.0.
    assert "reference / compiled" in section
    assert "2.00×" in section and "1.00×" in section
    assert section.index("MatMul") < section.index("Softmax")
    assert "Slowest nodes: compiled" in section


def _section(page: str, name: str) -> str:
    section = page[page.index(f'<section id="{name}">') :]
    return section[: section.index("</section>")]


def test_speedup_heading_states_the_order_that_holds(full_report):
    """Issue 25 item 9: "predicted < measured < ideal" was printed whatever the numbers were."""
    page = render_html(full_report)  # measured 1.50, predicted 1.60 on every GPU, ideal 1.67
    assert "<h3>Why measured 1.50× &lt; predicted 1.60× &lt; ideal 1.67×</h3>" in page
    assert "speedup 1.60× on every GPU;" in page and "predicted &lt; measured &lt; ideal" not in page
    full_report["speedup"][0]["measured"] = 1.9  # above the FLOP ratio (caches)
    full_report["predictions"][1]["speedup"] = 1.2
    page = render_html(full_report)
    assert "<h3>Why predicted 1.60× &lt; ideal 1.67× &lt; measured 1.90×</h3>" in page
    assert "exceeds the ideal 1.67× here" in page and "speedup 1.20–1.60× (median 1.60×)" in page
    assert "ideal (FLOP ratio) 1.67×" in _section(page, "summary")
    full_report["speedup"][0]["measured"] = 1.668
    assert "<h3>Why predicted 1.60× &lt; measured 1.67× ≈ ideal 1.67×</h3>" in render_html(full_report)


def test_prediction_table_calls_the_roofline_a_lower_bound(full_report):
    section = _section(render_html(full_report), "predictions")
    assert '<th class="">lower bound ms</th>' in section and "ideal ms" not in section
    assert "roofline lower bound in the table" in section and "ideal roofline" not in section


def test_latency_sections_from_compare_models_rows_validate():
    rows = [
        {"kind": "latency", "engine": "onnxruntime", "model": m, "batch": 2, "seq": 16, "median_ms": ms,
         "p90_ms": ms, "p99_ms": ms, "mean_ms": ms, "std_ms": 0.0, "min_ms": ms, "runs": 10,
         "throughput": 2 / ms * 1e3, "peak_rss_mb": 120.5, "rel_ci": 0.0, "stop_reason": "stable"}
        for m, ms in (("reference", 3.0), ("compiled", 2.0))
    ] + [
        {"kind": "speedup", "engine": "onnxruntime", "model": "compiled", "reference": "reference",
         "batch": 2, "seq": 16, "measured": 1.5}
    ]  # fmt: skip
    sections = latency_sections(rows, ideal={(2, 16): 1.8})
    assert [r["model"] for r in sections["latency"]] == ["reference", "compiled"]
    assert all("kind" not in r for r in sections["latency"])
    assert sections["speedup"] == [
        {"engine": "onnxruntime", "batch": 2, "seq": 16, "measured": 1.5, "ideal_speedup": 1.8, "runs": 10,
         "target_ci": 0.02, "tight": True, "ci": [1.5, 1.5]}
    ]  # fmt: skip
    loose = [{**r, "rel_ci": 0.25, "stop_reason": "budget"} if r["kind"] == "latency" else r for r in rows]
    wide = latency_sections(loose)["speedup"][0]
    assert not wide["tight"] and wide["ci"] == [
        pytest.approx(3 * 0.75 / (2 * 1.25)),
        pytest.approx(3 * 1.25 / (2 * 0.75)),
    ]
    assert "not tight" in render_html({**MINIMAL, **latency_sections(loose)})
    report = {**MINIMAL, **sections}
    validate_report(report)
    assert _parse(render_html(report)).images.keys() == {"plot-latency", "plot-speedup"}


def test_latency_sections_rejects_other_model_names():
    with pytest.raises(ConfigError, match="'dense'"):
        latency_sections([{"kind": "latency", "engine": "x", "model": "dense", "batch": 1, "seq": 1}])


def test_minimal_report_says_what_was_not_computed():
    page = render_html(MINIMAL)
    parsed = _parse(page)
    assert parsed.images == {}
    assert page.count("Not computed for this run.") == 8  # passes … predictions, quality
    assert "sparsity" not in parsed.sections


def test_write_report_writes_json_and_html(tmp_path, full_report):
    json_path, html_path = write_report(tmp_path / "out", full_report)
    assert json.loads(json_path.read_text()) == full_report
    assert html_path.read_text() == render_html(full_report)


def test_write_report_refuses_an_invalid_report(tmp_path, full_report):
    full_report["latency"][0]["batch"] = 0
    with pytest.raises(BadInputError, match=r"\$\.latency\[0\]\.batch"):
        write_report(tmp_path / "out", full_report)
    assert not (tmp_path / "out").exists()


# --- in a browser ------------------------------------------------------------------------------------------

_PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-natural-width", String(img.naturalWidth));
    img.setAttribute("data-natural-height", String(img.naturalHeight));
    img.setAttribute("data-complete", String(img.complete));
  }
  document.body.setAttribute("data-probed", "yes");
});
</script>"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_headless_chromium_decodes_every_plot(tmp_path, full_report):
    page = render_html(full_report).replace("</body>", _PROBE + "</body>")
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        (tmp_path / "report.html").as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert re.search(r'<body[^>]*data-probed="yes"', dom), "the load event never fired"
    images = _parse(dom).images
    assert list(images) == PLOT_IDS
    expected = _parse(render_html(full_report)).images
    for img_id, attrs in images.items():
        assert attrs["data-complete"] == "true"
        width, height = _png_size(expected[img_id]["src"])
        assert (int(attrs["data-natural-width"]), int(attrs["data-natural-height"])) == (width, height)
