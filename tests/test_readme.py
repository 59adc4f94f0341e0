"""The first run: the README's commands as a user copies them, and the CLI demo into a folder that does not exist.

The SmolLM2 demo takes about five minutes on 2 cores, so the CLI demo here runs on the bundled MiniLM (the same
code path: bundled model → masks → compile → report); CI's `first-run` job runs the README's SmolLM2 command.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest

from prune2deploy.cli import main
from tools.readme_commands import README, bash_blocks, numbered_commands

pytestmark = pytest.mark.slow

TEXT = README.read_text()

#: README examples that load SmolLM2 (minutes each) run as written on a stand-in with the same code path: a
#: tiny Llama HF folder with SmolLM2's attention layout (3 query heads per kv head), so `--heads 0.25` removes
#: heads unevenly inside kv groups as it does on SmolLM2.
STAND_IN_FOR = "smollm2-135m"
CHEAP = ("inspect", "verify", "profile", "predict")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """`prune2deploy demo --model minilm-l6` into a nested folder whose parents do not exist yet."""
    out = tmp_path_factory.mktemp("first-run") / "fresh" / "nested" / "demo"
    assert not out.parent.exists()
    code = main(["demo", "--model", "minilm-l6", "--out", str(out), "--budget", "3"])
    return out, code


def test_demo_through_the_cli_into_a_fresh_nested_folder(demo_dir, capsys):
    out, code = demo_dir
    assert code == 0
    for name in ("model.onnx", "reference.onnx", "report.json", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*")), "no staging or temporary folder is left behind"
    report = json.loads((out / "report.json").read_text())
    removed = next(p for p in report["passes"] if p["pass"] == "remove-channels")["record"]["channels_removed"]
    assert removed == 6 * round(0.3 * 1536)  # the demo's 30% of every MiniLM MLP's 1536 neurons
    assert report["verification"]["passed"]
    # the folder reproduces itself: the plan and masks it was compiled from are inside, named by the manifest
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"] == "inputs/plan.yaml" and manifest["masks"]["path"] == "inputs/masks.safetensors"
    assert set(manifest["outputs"]) >= {"inputs/plan.yaml", "inputs/masks.safetensors", "model.onnx"}
    assert (out / "inputs" / "plan.yaml").is_file()
    assert report["input"]["bundled"] == "minilm-l6"
    speed = report["speedup"][0]
    assert speed["runs"] >= 5 and "tight" in speed and speed["ci"][0] <= speed["measured"] <= speed["ci"][1]
    page = (out / "report.html").read_text()
    assert "prune2deploy report: minilm-l6" in page and "95% CI" in page
    assert re.search(r"Why (measured|predicted|ideal) [0-9.]+×", page), "the speedups' order, with the numbers"


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


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A 2-layer Llama folder (hidden 96, 6 query / 2 kv heads of 16, MLP 96) standing in for SmolLM2, with a
    word-level tokenizer over the bundled calibration text (Wanda calibrates on text, as it does on SmolLM2)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prune2deploy.pruning.calibration import bundled_text
    from tests.fixtures.models import tiny_llama

    folder = tmp_path_factory.mktemp("stand-in") / "smollm2-stand-in"
    config = {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16}
    tiny_llama(random_norms=True, max_position_embeddings=256, **config).save_pretrained(folder)
    words = Counter(bundled_text().split()).most_common(124)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, (w, _) in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    return folder


def _examples() -> list[str]:
    block = next(b for b in bash_blocks(TEXT) if "prune2deploy inspect build/demo/model.onnx" in b)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _as_run_here(argv: list[str], demo: Path, build: Path, stand_in: Path) -> list[str]:
    """The README line's arguments with its folders moved under this test's: build/demo → the MiniLM demo's
    output, other build/ paths → a scratch build folder, the SmolLM2 name → the stand-in folder."""
    moved = []
    for arg in argv:
        if arg.startswith("build/demo"):
            arg = str(demo) + arg[len("build/demo") :]
        elif arg.startswith("build/"):
            arg = str(build / arg[len("build/") :])
        elif arg == STAND_IN_FOR:
            arg = str(stand_in)
        moved.append(arg)
    return moved


def test_readme_examples_run_as_written(demo_dir, stand_in, tmp_path, capsys):
    """Every line of the README's "Next steps" block runs here in order and exits 0 — the cheap ones on the MiniLM
    demo's folder, the SmolLM2 ones on the stand-in; an engine this machine lacks may exit 2 with its install line."""
    out, code = demo_dir
    assert code == 0
    ran = []
    for line in _examples():
        argv = shlex.split(line)
        assert argv[0] == "prune2deploy", line
        argv = _as_run_here(argv[1:], out, tmp_path / "build", stand_in)
        assert argv[0] in CHEAP or STAND_IN_FOR in line, f"unclassified example: {line}"
        code = main(argv)
        captured = capsys.readouterr()
        if code == 2 and "--engine" in argv:
            assert "cannot build here" in captured.err and "pip install" in captured.err, line
            continue
        assert code == 0, f"{line}\n{captured.out[-2000:]}\n{captured.err[-2000:]}"
        ran.append(argv[0])
        if argv[0] == "predict":
            assert "jetson-orin-nano-8gb" in captured.out and "h100-sxm" in captured.out
        if argv[0] == "compile":
            report = json.loads((Path(argv[argv.index("--out") + 1]) / "report.json").read_text())
            assert report["verification"]["passed"], line
            heads = next(p for p in report["passes"] if p["pass"] == "remove-heads")["record"]
            assert heads["heads_removed"] > 0, "the stand-in must lose heads (unevenly within kv groups)"
            engine = argv[argv.index("--engine") + 1] if "--engine" in argv else None
            assert report.get("engine", {}).get("engine") == engine, line
    assert set(CHEAP) | {"prune", "compile"} <= set(ran)


def test_readme_python_api_snippet(tmp_path, monkeypatch):
    """The Python API block, run as is in a scratch folder (MiniLM: prune + compile, about a minute)."""
    block = next(b for b in TEXT.split("```python\n")[1:] if "api.compile" in b).split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert Path("build/api/compiled/model.onnx").is_file()
    report = json.loads(Path("build/api/compiled/report.json").read_text())
    assert report["verification"]["passed"]
    assert report["model"]["compiled"]["params"] < report["model"]["reference"]["params"]
