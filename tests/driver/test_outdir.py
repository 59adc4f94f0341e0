"""--overwrite replaces a folder this tool wrote, including the sub-folders it writes (genai/, engine/, inputs/)."""

from __future__ import annotations

import json

from prune2deploy.driver.outdir import foreign_contents


def _output_folder(tmp_path, listed: dict[str, str]):
    out = tmp_path / "out"
    out.mkdir()
    for name in listed:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    manifest = {"tool": {"name": "prune2deploy"}, "outputs": listed}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_tools_own_sub_folders_are_replaceable(tmp_path):
    out = _output_folder(tmp_path, {"model.onnx": "0", "inputs/plan.yaml": "1", "inputs/masks.safetensors": "2"})
    (out / "genai").mkdir()
    (out / "engine").mkdir()
    assert foreign_contents(out) is None


def test_a_folder_the_manifest_does_not_account_for_is_not(tmp_path):
    out = _output_folder(tmp_path, {"model.onnx": "0"})
    (out / "src").mkdir()
    assert "src" in foreign_contents(out)
