"""GPU names on the command line: keys, aliases, unambiguous prefixes; errors list the catalog."""

from __future__ import annotations

import pytest

from prune2deploy.cli import main
from prune2deploy.errors import ConfigError
from prune2deploy.profiling.roofline import load_catalog, resolve_gpus


def test_prefix_alias_and_key_resolve_to_one_gpu():
    catalog = load_catalog()
    keys = [s.key for s in resolve_gpus(["jetson-orin-nano", "H100", "orin-nano", "l4"], catalog)]
    assert keys == ["jetson-orin-nano-8gb", "h100-sxm", "jetson-orin-nano-8gb", "l4"]


def test_ambiguous_and_unknown_names_say_what_exists():
    catalog = load_catalog()
    with pytest.raises(ConfigError, match=r"ambiguous.*jetson-agx-orin-64gb.*jetson-orin-nano-8gb"):
        resolve_gpus(["jetson"], catalog)
    with pytest.raises(ConfigError, match=r"unknown GPU 'b200'.*h100-sxm \(h100, h100-sxm5\)"):
        resolve_gpus(["b200"], catalog)


def test_predict_checks_gpu_names_before_loading(tmp_path, capsys):
    missing = tmp_path / "never-written.onnx"
    assert main(["predict", str(missing), "--gpu", "b200"]) == 2
    assert "unknown GPU 'b200'" in capsys.readouterr().err  # the name, not the missing file, is reported first
    assert main(["compile", str(missing), "--out", str(tmp_path / "o"), "--gpu", "b200", "--quiet"]) == 2
    assert "unknown GPU 'b200'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
