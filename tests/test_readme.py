"""The first run: the README's commands as a user copies them, and the CLI demo into a folder that does not exist.

The SmolLM2 demo takes about five minutes on 2 cores, so the CLI demo here runs on the bundled MiniLM (the same
code path: bundled model → masks → compile → report); CI's `first-run` job runs the README's SmolLM2 command.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest

from prune2deploy.cli import main
from tools.readme_commands import README, bash_blocks, numbered_commands

pytestmark = pytest.mark.slow

TEXT = README.read_text()

#: README example → why this test does not run it (each costs minutes on SmolLM2; CI's demo job covers load +
#: export + compile, tests/test_cli.py covers prune/compile on a tiny model).
TOO_SLOW = {
    "prune smollm2-135m": "loads SmolLM2 and runs Wanda calibration (~2 min)",
    "compile smollm2-135m": "exports SmolLM2 (~2-3 min); the same path as the demo",
}
CHEAP = ("inspect", "verify", "profile", "predict")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """`prune2deploy demo --model minilm-l6` into a nested folder whose parents do not exist yet."""
    out = tmp_path_factory.mktemp("first-run") / "fresh" / "nested" / "demo"
    assert not out.parent.exists()
    code = main(["demo", "--model", "minilm-l6", "--out", str(out), "--profile-budget", "3"])
    return out, code


def test_demo_through_the_cli_into_a_fresh_nested_folder(demo_dir, capsys):
    out, code = demo_dir
    assert code == 0
    for name in ("model.onnx", "reference.onnx", "report.json", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*")), "no staging or temporary folder is left behind"
    report = json.loads((out / "report.json").read_text())
    removed = next(p for p in report["passes"] if p["pass"] == "remove-channels")["record"]["channels_removed"]
    assert removed == 6 * 1536 // 2  # half of every MiniLM MLP's 1536 neurons
    assert report["verification"]["passed"]
    assert report["input"]["bundled"] == "minilm-l6"
    speed = report["speedup"][0]
    assert speed["runs"] >= 5 and "tight" in speed and speed["ci"][0] <= speed["measured"] <= speed["ci"][1]
    page = (out / "report.html").read_text()
    assert "prune2deploy report: minilm-l6" in page and "95% CI" in page and "Why predicted &lt; measured" in page


def test_demo_rerun_without_overwrite_fails_before_any_work(demo_dir, capsys):
    out, _ = demo_dir
    start = time.perf_counter()
    assert main(["demo", "--model", "minilm-l6", "--out", str(out), "--quiet"]) == 2
    assert time.perf_counter() - start < 2.0
    assert "--overwrite" in capsys.readouterr().err


def test_readme_install_is_what_ci_runs():
    commands = numbered_commands(TEXT)
    assert commands[1].endswith("prune2deploy demo --out build/demo --overwrite")
    for command in commands.values():
        # torch first, from the CPU wheel index: plain PyPI gives Linux the CUDA build
        torch_step = next(step for step in command.split("&&") if "pip install torch" in step)
        assert "--index-url https://download.pytorch.org/whl/cpu" in torch_step
        assert command.index("pip install torch") < command.index("pip install -e")
    ci_run = (README.parent / ".ci" / "run").read_text().splitlines()
    assert commands[2] in ci_run  # .ci/run runs the README's test command verbatim
    ci = (README.parent / ".github" / "workflows" / "ci.yml").read_text()
    assert "tools/readme_commands.py 1" in ci and "tools/readme_commands.py 2" in ci


def _examples() -> list[str]:
    block = next(b for b in bash_blocks(TEXT) if "prune2deploy inspect build/demo/model.onnx" in b)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_examples_run_as_written(demo_dir, capsys):
    """Every line of the README's "Next steps" block is run here (on the MiniLM demo's folder) or listed in
    TOO_SLOW with the reason; a new example must be classified."""
    out, code = demo_dir
    assert code == 0
    ran = []
    for line in _examples():
        argv = shlex.split(line)
        assert argv[0] == "prune2deploy", line
        if argv[1] in CHEAP:
            argv = [str(out) + a[len("build/demo") :] if a.startswith("build/demo") else a for a in argv[1:]]
            assert main(argv) == 0, line
            ran.append(argv[0])
            text = capsys.readouterr().out
            if argv[0] == "predict":
                assert "jetson-orin-nano-8gb" in text and "h100-sxm" in text
        else:
            assert any(line.startswith(f"prune2deploy {key}") for key in TOO_SLOW), f"unclassified example: {line}"
    assert sorted(set(ran)) == sorted(CHEAP)


def test_readme_python_api_snippet(tmp_path, monkeypatch):
    """The Python API block, run as is in a scratch folder (MiniLM: prune + compile, about a minute)."""
    block = next(b for b in TEXT.split("```python\n")[1:] if "api.compile" in b).split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert Path("build/api/compiled/model.onnx").is_file()
    report = json.loads(Path("build/api/compiled/report.json").read_text())
    assert report["verification"]["passed"]
    assert report["model"]["compiled"]["params"] < report["model"]["reference"]["params"]
