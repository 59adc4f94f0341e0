"""The sweep file: validation names the key and the variant; ids are readable and stable; hashes change
with any option."""

from __future__ import annotations

import pytest

from prune2deploy.errors import ConfigError
from prune2deploy.sweep.run import accelerator_type, mask_folder, task_resources
from prune2deploy.sweep.spec import expand, load_sweep, parse_sweep

ISSUE_EXAMPLE = """
model: minilm-l6
grid:
  criterion: [magnitude, wanda]
  mlp: [0.25, 0.5]
prune: {samples: 4, seq_len: 32}
compile: {batch: [1], seq: [64]}
"""


def test_issue_example_expands_to_four_validated_variants(tmp_path):
    path = tmp_path / "minilm.yaml"
    path.write_text(ISSUE_EXAMPLE)
    spec = load_sweep(path)
    variants = expand(spec, source_key="k")
    assert spec.name == "minilm"
    assert [v.point for v in variants] == [
        {"criterion": "magnitude", "mlp": 0.25},
        {"criterion": "magnitude", "mlp": 0.5},
        {"criterion": "wanda", "mlp": 0.25},
        {"criterion": "wanda", "mlp": 0.5},
    ]
    assert variants[0].id.startswith("criterion-magnitude_mlp-0.25_")
    assert variants[2].prune.criterion == "wanda" and variants[2].prune.samples == 4
    assert variants[0].compile == {"profile_batches": [1], "profile_seqs": [64]}
    options = variants[0].compile_options(plan="p.yaml")
    assert options.profile_seqs == [64] and str(options.plan) == "p.yaml"
    # stable ids; another checkpoint (source key) or fixed option gives other hashes
    assert [v.id for v in expand(spec, source_key="k")] == [v.id for v in variants]
    assert expand(spec, source_key="other")[0].hash != variants[0].hash
    changed = parse_sweep({**spec.model_dump(), "prune": {"samples": 8, "seq_len": 32}})
    assert expand(changed, source_key="k")[0].hash != variants[0].hash
    assert len({v.hash for v in variants}) == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"grid": {"mlp": [0.5]}}, "'model'"),
        ({"model": "m", "grid": {"ratio": [0.5]}}, "unknown grid key 'ratio'"),
        ({"model": "m", "grid": {"mlp": []}}, "has no values"),
        ({"model": "m", "grid": {"mlp": [0.5]}, "prune": {"sample": 4}}, "unknown prune option"),
        ({"model": "m", "grid": {"mlp": [0.5]}, "compile": {"plan": "x"}}, "set by the sweep"),
        ({"model": "m", "grid": {"mlp": [0.5]}, "colour": 1}, "unknown key 'colour'"),
        ({"model": "m", "grid": {"mlp": [0.5]}, None: None}, "unknown key None"),  # YAML "?": was exit 3
    ],
)
def test_bad_sweep_files_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(data)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"mlp": [0.5, 1.5]}, r"variant mlp=1.5: prune: 'mlp'"),
        ({"mlp": [0.5], "precision": ["fp8"]}, r"variant mlp=0.5,precision=fp8: compile: option 'precision'"),
        ({"mlp": [0.5], "gpu": ["b999"]}, "unknown GPU 'b999'"),
        ({"mlp": [0.5], "engine": ["tensorrt-llm"]}, "unknown engine"),
        ({"nm": ["2-4"]}, "N:M is written like '2:4'"),
        ({"criterion": ["wanda"], "nm": ["4:2"]}, "0 < N < M"),
    ],
)
def test_every_variant_is_validated_before_anything_runs(grid, message):
    with pytest.raises(ConfigError, match=message):
        expand(parse_sweep({"model": "m", "grid": grid}))


def test_compile_only_grid_and_gpu_aliases():
    variants = expand(parse_sweep({"model": "m", "grid": {"regroup_gqa": [1, 2], "gpu": ["A100"]}}))
    assert [v.compile for v in variants] == [
        {"kv_heads": 1, "gpus": ["a100-sxm-80gb"]},
        {"kv_heads": 2, "gpus": ["a100-sxm-80gb"]},
    ]
    assert not variants[0].prune.prunes()
    assert variants[0].id.startswith("regroup_gqa-1_gpu-a100_")


def test_ray_placement_by_engine_and_gpu():
    cluster = {"CPU": 16.0, "GPU": 2.0, "accelerator_type:A100": 1.0, "accelerator_type:L4": 1.0}
    assert accelerator_type("h100-sxm") == "H100" and accelerator_type("a100-40gb") == "A100"
    assert accelerator_type("l4") == "L4" and accelerator_type("jetson-orin-nano-8gb") is None
    gpu = task_resources({"engine": "tensorrt", "gpus": ["a100-sxm-80gb"]}, cluster, [8, 8])
    assert gpu == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A100"}
    with pytest.raises(ConfigError, match="accelerator_type H100; the cluster has A100, L4"):
        task_resources({"engine": "tensorrt", "gpus": ["h100-sxm"]}, cluster, [8, 8])
    with pytest.raises(ConfigError, match="has none"):
        task_resources({"engine": "tensorrt"}, {"CPU": 2.0}, [2])
    # CPU measurement: one per machine (the profiler resource, else every CPU of the smallest node)
    assert task_resources({"engine": "onnxruntime"}, {**cluster, "p2d_cpu_profiler": 2.0}, [8, 8]) == {
        "num_cpus": 1,
        "resources": {"p2d_cpu_profiler": 1},
    }
    assert task_resources({"engine": "onnxruntime", "gpus": ["l4"]}, cluster, [8, 4]) == {"num_cpus": 4}
    assert task_resources({"engine": "onnxruntime", "profile": False}, cluster, [8, 4]) == {"num_cpus": 1}


def test_variants_differing_only_in_compile_options_share_their_masks(tmp_path):
    variants = expand(parse_sweep({"model": "m", "grid": {"mlp": [0.25, 0.5], "gpu": ["l4", "h100"]}}))
    folders = [mask_folder(v, tmp_path, "k") for v in variants]
    assert folders[0] == folders[1] != folders[2] == folders[3]
    assert folders[0].name.startswith("magnitude-") and mask_folder(variants[0], tmp_path, "other") != folders[0]


_ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)


def test_sweep_files_are_read_with_the_config_files_checks(tmp_path):
    """A sweep file gets the guarded reader of config files: no alias bomb, no non-UTF-8, no huge file."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ISSUE_EXAMPLE + _ALIAS_BOMB)
    with pytest.raises(ConfigError, match="anchors and aliases") as info:
        load_sweep(bomb)
    assert info.value.exit_code == 2 and str(bomb) in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: [\xff\xfe]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_sweep(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_text(ISSUE_EXAMPLE + "# padding\n" * (1 << 17))
    with pytest.raises(ConfigError, match="at most"):
        load_sweep(huge)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_oversized_grid_is_refused_from_its_axes_before_building_a_variant(monkeypatch):
    """A 10^6-point grid is refused from the product of its axes' lengths: no variant is built (it used to
    expand and validate every one, then submit them all)."""
    from prune2deploy.sweep import spec as spec_module

    monkeypatch.setattr(spec_module, "_variant", lambda *a, **k: pytest.fail("a variant was built"))
    ratios = [round(i / 100, 2) for i in range(100)]
    spec = parse_sweep({"model": "m", "grid": {"mlp": ratios, "heads": ratios, "hidden": ratios}})
    assert spec_module.count_variants(spec) == 10**6
    with pytest.raises(ConfigError, match=r"1,000,000 variants \(mlp 100 × heads 100 × hidden 100\).*at most 1,000"):
        expand(spec, where="big.yaml")
    with pytest.raises(ConfigError, match="Narrow it"):
        next(spec_module.iter_variants(spec))


def test_variant_id_longer_than_a_file_name_allows_is_refused():
    """An id names the variant's folders: one over VARIANT_ID_BYTES bytes is a ConfigError naming the variant
    and the rule, raised while expanding (before Ray starts), not a compile failure after it."""
    from prune2deploy.limits import VARIANT_ID_BYTES

    long_round = 10**230
    with pytest.raises(ConfigError, match=rf"variant mlp=0.5,round_to={long_round}: its id is \d+ bytes; ids are at "
                       rf"most {VARIANT_ID_BYTES}") as info:  # fmt: skip
        expand(parse_sweep({"model": "m", "grid": {"mlp": [0.5], "round_to": [8, long_round]}}))
    assert info.value.exit_code == 2
    assert all(len(v.id) <= VARIANT_ID_BYTES for v in expand(parse_sweep({"model": "m", "grid": {"round_to": [8]}})))


def test_model_name_longer_than_a_file_name_is_read_as_a_name(tmp_path):
    """Looking for the model beside the sweep file must not fail on a name no file system holds (found by the
    input fuzz: ENAMETOOLONG ended as an OSError)."""
    path = tmp_path / "s.yaml"
    path.write_text("model: " + "a" * 300 + "\ngrid: {mlp: [0.5]}\n")
    assert load_sweep(path).model == "a" * 300


def test_global_ranking_options_are_sweep_axes():
    """`prune --global-scale` / `--min-keep` are grid axes too: each variant carries them to prune_model, and
    they are refused (before anything runs) where they would do nothing (per_layer: true) or are out of range."""
    grid = {"mlp": [0.5], "per_layer": [False], "global_scale": ["standardize", "raw"], "min_keep": [0.1]}
    variants = expand(parse_sweep({"model": "m", "grid": grid}))
    assert [(v.prune.global_scale, v.prune.min_keep) for v in variants] == [("standardize", 0.1), ("raw", 0.1)]
    assert len({v.id for v in variants}) == 2
    with pytest.raises(ConfigError, match="set per_layer: false"):
        expand(parse_sweep({"model": "m", "grid": {"mlp": [0.5], "global_scale": ["raw"]}}))
    with pytest.raises(ConfigError, match=r"min_keep 0\.6 keeps more of every layer"):
        expand(parse_sweep({"model": "m", "grid": {"mlp": [0.5], "per_layer": [False], "min_keep": [0.6]}}))
