"""Pruning-aware sanity of the cost model: a narrower model is never predicted slower, on every catalog GPU.

Where pruning buys less than its FLOP ratio the row says why (``cause``). Reproduces the three anomalies
reported against the model: the pruned SmolLM2 predicted slower than the dense one on some GPUs, a Llama
with 75% of its MLP neurons removed predicted slower than with 25% (A100, H100), and a 2:4 model whose
FLOPs did not change predicted slower than itself dense.
"""

from __future__ import annotations

import itertools

import pytest

from prune2deploy.analysis.cost import ModelCost, NodeCost
from prune2deploy.profiling.costmodel import explain_gain, gemm_utilisation, kernels_from_cost, price
from prune2deploy.profiling.prediction import Priced, compare_costs
from prune2deploy.profiling.roofline import load_catalog
from prune2deploy.profiling.shape_only import config_rows, model_kernels, shape_from_config

SMOLLM2 = {  # SmolLM2-135M's config.json (the bundled model)
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "hidden_act": "silu",
}
LLAMA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "hidden_act": "silu",
}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _mlp_plan(width: int, layers: int) -> dict:
    return {"layers": [{"index": i, "mlp": {"kept": list(range(width))}} for i in range(layers)]}


def _latencies(config, catalog, *, precision="fp16", engine="tensorrt", **shape):
    kernels = model_kernels(shape_from_config(config), precision=precision, engine=engine, **shape)
    return {key: price(kernels, spec, precision=precision, engine=engine).latency_ms
            for key, spec in catalog.items() if spec.supports(precision)}  # fmt: skip


@pytest.mark.parametrize("config", [SMOLLM2, LLAMA_7B], ids=["smollm2", "llama-7b"])
@pytest.mark.parametrize("engine", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("step", [{"batch": 1, "seq": 128}, {"batch": 4, "decode": True, "past": 512}])
def test_removing_mlp_channels_never_raises_latency(catalog, config, engine, step):
    """Every catalog GPU: MLP widths from full down to 1/16, odd widths (1075, 4127 …) included."""
    full = config["intermediate_size"]
    widths = sorted(
        {full, round(full * 0.7), round(full * 0.7) - 1, full // 2 + 3, full // 4, full // 16}, reverse=True
    )
    previous = None
    for width in widths:
        now = _latencies({**config, "intermediate_size": width}, catalog, engine=engine, **step)
        if previous is not None:
            raised = {g: (previous[g], now[g]) for g in now if now[g] > previous[g] * (1 + 1e-12)}
            assert not raised, f"width {width}: {raised}"
        previous = now


def test_removing_heads_never_raises_latency(catalog):
    widths = [(9, 3), (6, 3), (6, 2), (3, 1)]
    previous = None
    for heads, kv in widths:
        config = {**SMOLLM2, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 64}
        now = _latencies(config, catalog, batch=1, seq=256)
        if previous is not None:
            assert all(now[g] <= previous[g] for g in now), (heads, kv)
        previous = now


def _rising(times: list[float]) -> bool:
    return all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(times))


def test_gemm_time_never_falls_as_a_dimension_grows():
    """Time ∝ MACs / utilisation: never lower for a larger M, N or K on any SM count (split-K included)."""
    for sms in (8, 16, 40, 58, 108, 132, 142):
        for base in ((128, 576, 576), (1, 1536, 576), (4096, 1075, 4096), (128, 64, 147)):
            times = []
            for grow in range(0, 400, 7):
                m, n, k = base[0], base[1] + grow, base[2]
                times.append(m * n * k / gemm_utilisation(m, n, k, sms))
            assert _rising(times), (sms, base)
            times = [base[0] * base[1] * (base[2] + g) / gemm_utilisation(base[0], base[1], base[2] + g, sms)
                     for g in range(0, 400, 7)]  # fmt: skip
            assert _rising(times), (sms, base, "k")


def test_llama_mlp_75_percent_pruned_faster_than_25(catalog):
    """The sweep's report: 75% of the MLP removed predicted slower than 25% (9.32 vs 9.10 ms, A100/H100). Not
    reproduced on Llama-7B's shapes; held here on every GPU."""
    for gpu in catalog:
        rows = {}
        for pruned in (0.25, 0.5, 0.75):
            width = round(11008 * (1 - pruned))
            (row,) = config_rows(LLAMA_7B, plan=_mlp_plan(width, 32), gpus=[gpu], seq=128)
            rows[pruned] = row
        assert rows[0.75]["compiled_ms"] < rows[0.5]["compiled_ms"] < rows[0.25]["compiled_ms"], gpu
        assert rows[0.75]["speedup"] > rows[0.25]["speedup"] > 1.0


def _decoder_cost(config: dict, width: int, *, tokens: int = 128) -> ModelCost:
    """Per-node costs as analysis.cost writes them for an exported fp32 Llama (weight MatMuls and norms only)."""
    h, q = (
        config["hidden_size"],
        config["num_attention_heads"] * (config["hidden_size"] // config["num_attention_heads"]),
    )
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    nodes = []

    def matmul(name, layer, n, k):
        m = tokens
        nodes.append(NodeCost(name, "MatMul", "matmul", layer, 2 * m * n * k, 4 * m * k, 4 * m * n, 4 * n * k,
                              m * k + m * n, 4 * (m * k + m * n), n * k, 4 * n * k))  # fmt: skip

    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        nodes.append(NodeCost(f"{layer}.norm", "ReduceMean", "reduction", layer, tokens * h, 4 * tokens * h,
                              4 * tokens, 0, tokens * h + tokens, 4 * (tokens * h + tokens)))  # fmt: skip
        for name, n, k in (("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q)):
            matmul(f"{layer}.self_attn.{name}_proj", f"{layer}.self_attn", n, k)
        for name, n, k in (("gate", width, h), ("up", width, h), ("down", h, width)):
            matmul(f"{layer}.mlp.{name}_proj", f"{layer}.mlp", n, k)
    matmul("lm_head", "lm_head", config["vocab_size"], h)
    return ModelCost(nodes, 0, {}, {}, "test", batch=1, seq=tokens)


def test_graph_path_reads_true_gemm_shapes():
    """From per-node costs: M = tokens, N and K as exported (not √weights, which moved tile boundaries)."""
    kernels = kernels_from_cost(_decoder_cost(SMOLLM2, 1075), engine="tensorrt")
    gate = next(k for k in kernels if k.name.endswith("mlp.gate_proj"))
    down = next(k for k in kernels if k.name.endswith("mlp.down_proj"))
    assert (gate.m, gate.n, gate.k) == (128, 1075, 576) and (down.m, down.n, down.k) == (128, 576, 1075)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("engine", ["tensorrt", "onnxruntime", "torch"])
def test_pruned_smollm2_never_slower_than_dense_from_the_graph(catalog, precision, engine):
    """The demo's case: 30% of every MLP removed (1536 → 1075) was reported 0.93-1.09x across the catalog; on the
    demo's exported graphs fp32 Jetson AGX Orin gave 0.975x, because N ≈ K ≈ √weights put the 1075-wide GEMMs
    on a worse wave. ≥ 1 on every GPU, and where less than half the FLOP ratio is realised the row names why."""
    dense, pruned = Priced(_decoder_cost(SMOLLM2, 1536), {}), Priced(_decoder_cost(SMOLLM2, 1075), {})
    rows = compare_costs(dense, pruned, precision=precision, engine=engine)
    assert {r["gpu"] for r in rows} >= {"h100-sxm", "a100-sxm-80gb", "l4", "t4", "jetson-agx-orin-64gb"}
    for row in rows:
        assert row["speedup"] >= 1.0, row["gpu"]
        realised = (row["speedup"] - 1) / (row["ideal_speedup"] - 1)
        assert (row["cause"] is not None) == (realised < 0.5), (row["gpu"], row["cause"])
    h100 = next(r for r in rows if r["gpu"] == "h100-sxm")
    assert "too few tiles" in h100["cause"]  # and, at fp16, launch-bound


def test_cause_names_tile_quantisation_and_the_rounding_that_recovers_it(catalog):
    """1075 = 8·128 + 51: a ninth tile for 51 columns; rounding to 1024 recovers it (prune --round-to 128)."""
    orin = catalog["jetson-orin-nano-8gb"]
    dense = model_kernels(shape_from_config(SMOLLM2), batch=1, seq=128, engine="onnxruntime")
    odd = model_kernels(
        shape_from_config({**SMOLLM2, "intermediate_size": 1075}), batch=1, seq=128, engine="onnxruntime"
    )
    cause = explain_gain(dense, odd, orin, engine="onnxruntime", realised_below=1.0)
    assert "tile quantisation: widths 1075" in cause and "prune --round-to 128" in cause
    even = model_kernels(
        shape_from_config({**SMOLLM2, "intermediate_size": 1024}), batch=1, seq=128, engine="onnxruntime"
    )
    assert "tile quantisation" not in (explain_gain(dense, even, orin, engine="onnxruntime", realised_below=1.0) or "")
    assert price(even, orin, engine="onnxruntime").latency_ms < price(odd, orin, engine="onnxruntime").latency_ms


def test_shape_only_plan_rows_carry_the_reference_and_cause(catalog):
    rows = config_rows(SMOLLM2, plan=_mlp_plan(1075, 30), gpus=["h100-sxm", "t4"])
    for row in rows:
        assert row["ideal_speedup"] == pytest.approx(row["reference_gflops"] / row["gflops"])
        assert row["speedup"] >= 1.0 and row["reference_ms"] >= row["compiled_ms"]
    h100 = rows[0]
    assert h100["speedup"] < 1.05 and h100["cause"].startswith(f"{h100['speedup']:.2f}x of an ideal")


def test_two_four_with_unchanged_flops_never_slower_and_says_why(catalog):
    """2:4 keeps the FLOPs (ideal 1.0x); TensorRT uses sparse tactics only past M = 64 and only on GPUs with
    sparse tensor cores at the precision, so a batch-1 decode step stays at 1.00x and says so."""
    shape = shape_from_config(SMOLLM2)
    for step, expect in (({"batch": 1, "decode": True, "past": 128}, "dense tactic"),
                         ({"batch": 8, "seq": 512}, "sparse tactics at M = 4096")):  # fmt: skip
        dense = model_kernels(shape, **step)
        sparse = model_kernels(shape, sparse=True, **step)
        for key, spec in catalog.items():
            if not spec.supports("fp16"):
                continue
            d, s = price(dense, spec).latency_ms, price(sparse, spec).latency_ms
            assert s <= d, key
            note = explain_gain(dense, sparse, spec)
            assert note.startswith("2:4 on 120 of 121 GEMMs"), note  # qkv, o, gate_up, down x 30; lm_head dense
            assert (expect if spec.has_sparse("fp16") else "no 2:4 sparse tensor cores") in note, (key, note)
