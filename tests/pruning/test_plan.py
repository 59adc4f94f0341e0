"""Plan YAML round trip and validation errors that name the field."""

from __future__ import annotations

import re

import pytest
import yaml

from prune2deploy.errors import BadInputError, ConfigError
from prune2deploy.pruning.plan import dump_plan, load_plan, plan_to_dict
from prune2deploy.pruning.prune import prune_module


@pytest.fixture
def plan_file(tiny_llama_tied32, llama_calib, tmp_path):
    plan, _ = prune_module(
        tiny_llama_tied32,
        criterion="wanda",
        structures={"mlp": 0.25, "heads": 0.5, "hidden": 0.25, "layers": 0.5},
        calibration=llama_calib,
        round_to=8,
        nm=(2, 4),
    )
    path = tmp_path / "plan.yaml"
    dump_plan(plan, path)
    return plan, path


def test_round_trip(plan_file):
    plan, path = plan_file
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.calibration["sha256"] == plan.calibration["sha256"] and len(loaded.calibration["sha256"]) == 64
    assert loaded.nm == (2, 4) and loaded.method == "width+depth+2:4"
    assert loaded.layers[0].mlp.width == 48 and len(loaded.layers[0].mlp.kept) == 40  # 36 rounded to 40
    assert loaded.hidden.width == 32 and len(loaded.dropped_layers) == 1
    text = path.read_text()
    assert "kept: [" in text  # index lists stay on one line


def _edit(path, change):
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["ratios"].__setitem__("mlp", 1.5), "ratios.mlp"),
        (lambda d: d.pop("criterion"), "criterion"),
        (lambda d: d.__setitem__("criterion", "obd"), "criterion"),
        (lambda d: d.__setitem__("nm", [4, 2]), "nm"),
        (lambda d: d.__setitem__("round_to", 0), "round_to"),
        (lambda d: d.__setitem__("version", 7), "version"),
        (lambda d: d["layers"][1]["mlp"]["kept"].append(0), "layers[1].mlp.kept"),
        (lambda d: d["layers"][0]["mlp"]["removed"].pop(), "layers[0].mlp"),
        (lambda d: d["layers"][0]["mlp"].__setitem__("kept", "all"), "layers[0].mlp.kept"),
        (lambda d: d["layers"][0].__setitem__("layer", 9), "layers[0].layer"),
        (lambda d: d.__setitem__("dropped_layers", [5]), "dropped_layers[0]"),
        (lambda d: d["calibration"].__setitem__("sha256", "abc"), "calibration.sha256"),
        (lambda d: d.__setitem__("per_layer", "yes"), "per_layer"),
        (lambda d: d["hidden"].__setitem__("width", 31), "hidden.width"),
    ],
)
def test_validation_names_the_field(plan_file, change, field):
    _, path = plan_file
    _edit(path, change)
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}'")):
        load_plan(path)


def test_gqa_consistency_is_validated(plan_file):
    plan, path = plan_file
    data = plan_to_dict(plan)
    layer = data["layers"][0]
    layer["heads"] = {"width": 4, "kept": [0, 1], "removed": [2, 3]}  # group 1 (heads 2, 3) empty
    layer["kv_heads"] = {"width": 2, "kept": [0, 1], "removed": []}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"layers\[0\].kv_heads.kept.*keeps kv head 1"):
        load_plan(path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_plan(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_plan(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_plan(tmp_path / "list.yaml")


def test_plan_files_are_read_with_the_config_files_checks(plan_file, tmp_path):
    """A plan is a file a user hands in: YAML anchors and aliases (an alias bomb) and non-UTF-8 bytes are
    refused like in config files, with exit code 2 and the file's name."""
    _, plan_path = plan_file
    bomb = tmp_path / "bomb.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 8)}]" for i in range(8)]
    bomb.write_text(plan_path.read_text() + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="anchors and aliases") as info:
        load_plan(bomb)
    assert info.value.exit_code == 2 and str(bomb) in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(plan_path.read_bytes() + b"\nnote: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_plan(binary)
    assert load_plan(plan_path).criterion == "wanda"  # the plan itself still reads
    assert "&" not in plan_path.read_text()  # dump_plan never writes anchors, even for shared objects


@pytest.mark.parametrize(
    ("masks", "field"),
    [
        (5, "masks"),
        ({"file": 5}, "masks.file"),
        ({"file": "/etc/passwd", "sha256": "0" * 64}, "masks.file"),
        ({"file": "C:/masks.safetensors"}, "masks.file"),
        ({"file": " "}, "masks.file"),
        ({"file": "masks.safetensors", "sha256": "ABC"}, "masks.sha256"),
        ({"file": "masks.safetensors", "tensors": -1}, "masks.tensors"),
    ],
)
def test_masks_entry_is_validated(plan_file, masks, field):
    """``masks: 5``, a numeric or absolute file and a malformed hash are exit 2 naming the field (a number
    used to reach ``Path / 5`` and end as an internal error)."""
    _, path = plan_file
    _edit(path, lambda d: d.__setitem__("masks", masks))
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}'")) as info:
        load_plan(path)
    assert info.value.exit_code == 2


def test_oversized_plan_is_refused_before_parsing(tmp_path):
    """A 200 MB plan (the red team's) is refused from its size alone: nothing of it is read."""
    from prune2deploy.limits import PLAN_BYTES

    path = tmp_path / "plan.yaml"
    with open(path, "wb") as handle:  # sparse: 200 MB on paper, no disk used
        handle.truncate(200 << 20)
    assert PLAN_BYTES < 200 << 20
    with pytest.raises(ConfigError, match=f"plan files are at most {PLAN_BYTES} bytes") as info:
        load_plan(path)
    assert str(path) in str(info.value) and info.value.exit_code == 2
