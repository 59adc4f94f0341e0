"""Sample reports for the report tests: one with every section filled, one with only what is required."""

from __future__ import annotations

import copy

_FULL_REPORT = {
    "schema_version": 1,
    "tool": {
        "name": "prune2deploy",
        "version": "0.1.0",
        "libraries": {"onnx": "1.23.0", "onnxruntime": "1.31.1"},
    },
    "input": {"path": "models/tiny-llama", "kind": "hf", "sha256": "ab" * 32},
    "options": {"pipeline": "structured", "engine": ["onnxruntime"], "precision": "fp32"},
    "passes": [
        {
            "pass": "remove-channels",
            "exact": True,
            "modified": True,
            "record": {"channels_removed": 96, "groups": 4},
            "refused": {"model.layers.0.mlp": "a Reshape target is a run-time value"},
        },
        {"pass": "remove-heads", "exact": True, "modified": True, "record": {"heads_removed": 2}, "refused": {}},
        {"pass": "regroup-gqa", "exact": False, "modified": True, "record": {"kv_heads": [4, 2]}, "refused": {}},
    ],
    "model": {
        "reference": {"params": 1_000_000, "flops": 8_000_000, "nodes": 220},
        "compiled": {"params": 600_000, "flops": 4_800_000, "nodes": 214},
    },
    "per_layer": [
        {
            "layer": f"layers.{i}.mlp",
            "params_before": 200_000,
            "params_after": 100_000 + 10_000 * i,
            "flops_before": 1_600_000,
            "flops_after": 800_000 + 80_000 * i,
        }
        for i in range(4)
    ]
    + [
        {
            "layer": "lm_head",
            "params_before": 200_000,
            "params_after": 200_000,
            "flops_before": 1_600_000,
            "flops_after": 1_600_000,
        }
    ],
    "groups": {
        "total": 12,
        "prunable": 10,
        "blocked": [
            {
                "group": "g7",
                "node": "/model/Reshape_3",
                "op": "Reshape",
                "reason": "Reshape target is not constant",
            },
            {
                "group": "g9",
                "node": "/model/Custom",
                "op": "MyOp",
                "reason": "no axis rule for MyOp <custom>",
            },
        ],
    },
    "verification": {
        "exact": True,
        "passed": True,
        "tolerance": 1e-4,
        "feeds": ["batch=2 seq=7 seed=0"],
        "outputs": {"logits": {"max_abs": 3.1e-6, "max_rel": 2.0e-6, "scale": 1.55}},
    },
    "latency": [
        {
            "engine": "onnxruntime",
            "model": model,
            "batch": b,
            "seq": 128,
            "median_ms": ms,
            "p90_ms": ms * 1.1,
            "p99_ms": ms * 1.3,
            "mean_ms": ms * 1.02,
            "runs": 50,
            "throughput": b / ms * 1e3,
        }
        for b, ref_ms in ((1, 4.0), (8, 20.0))
        for model, ms in (("reference", ref_ms), ("compiled", ref_ms / 1.5))
    ],
    "speedup": [
        {"engine": "onnxruntime", "batch": 1, "seq": 128, "measured": 1.5, "ideal_speedup": 1.67},
        {"engine": "onnxruntime", "batch": 8, "seq": 128, "measured": 1.5, "ideal_speedup": None},
    ],
    "predictions": [
        {
            "gpu": gpu,
            "precision": "fp16",
            "batch": 8,
            "seq": 128,
            "reference_ms": ref,
            "compiled_ms": ref / 1.6,
            "speedup": 1.6,
            "measured_ms": measured,
        }
        for gpu, ref, measured in (("H100-SXM", 1.2, 0.8), ("L4", 6.0, None), ("A10", 4.5, None))
    ],
    "ops": {
        name: {
            "runs": 10,
            "model_run_ms": total * 1.2,
            "kernel_ms": total,
            "by_op_type": [
                {"op_type": "MatMul", "calls_per_run": 17.0, "ms_per_run": mm, "share": mm / total},
                {
                    "op_type": "Softmax",
                    "calls_per_run": 2.0,
                    "ms_per_run": total - mm,
                    "share": 1 - mm / total,
                },
            ],
            "top_nodes": [
                {
                    "node": "/layers.0/mlp/up/MatMul",
                    "op_type": "MatMul",
                    "provider": "CPUExecutionProvider",
                    "ms_per_run": mm / 4,
                    "share": mm / 4 / total,
                },
            ],
        }
        for name, mm, total in (("reference", 3.0, 4.0), ("compiled", 1.5, 2.5))
    },
    "sparsity": {"two_four": {"eligible_layers": 12, "sparse_tactics": 0}},
    "quality": {
        "computed": True,
        "kind": "lm",
        "text": "bundled evaluation text (prune2deploy/data/evaluation.txt)",
        "window": 128,
        "windows": 4,
        "comparisons": [
            {
                "candidate": "compiled",
                "reference": "masked reference",
                "kl_mean": 1e-9,
                "kl_max": 3e-9,
                "top1_agreement": 1.0,
                "ppl_reference": 12.5,
                "ppl_candidate": 12.5,
            },
            {
                "candidate": "compiled",
                "reference": "dense (before the masks)",
                "kl_mean": 0.0123,
                "kl_max": 0.4,
                "top1_agreement": 0.9375,
                "ppl_reference": 11.9,
                "ppl_candidate": 12.5,
            },
        ],
    },
}

MINIMAL_REPORT = {
    "schema_version": 1,
    "tool": {"name": "prune2deploy", "version": "0.1.0"},
    "input": {"path": "m.onnx", "kind": "onnx"},
    "options": {},
}


def full_report() -> dict:
    """A fresh copy of a report with every section filled; callers may modify it."""
    return copy.deepcopy(_FULL_REPORT)


def minimal_report() -> dict:
    """A fresh copy of a report with only the required sections."""
    return copy.deepcopy(MINIMAL_REPORT)
