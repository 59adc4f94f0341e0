"""From a user's existing ``.onnx`` (weights in external data) plus a mask file → compiled, verified ONNX.

Many users no longer have the training code, only an exported model and the masks their pruner wrote.
This example stands in for that: step 1 exports a small residual MLP network (LayerNorm → Linear → GELU →
Linear, plus the input) with ``torch.onnx.export(dynamo=True)`` into ``user/model.onnx`` +
``user/model.onnx.data``, as a user would have done. Then it writes one mask file with both kinds of keys
``api.compile`` accepts for an ONNX input:

- a **torch parameter name** (``blocks.0.up.weight``) in the parameter's own [out, in] layout: the compiler
  finds the ONNX tensor it became through the exporter's name-scope metadata (the exporter renames and
  transposes a Linear's weight into a MatMul input such as ``val_11`` of shape [in, out]);
- an **ONNX initializer name** (here the one that ``blocks.1.up.weight`` became) in the initializer's own
  layout: for models without name scopes, or masks computed on the ONNX graph itself.

Each mask removes a quarter (full mode) or half (``--quick``) of a block's hidden neurons: the rows of the
up projection and its bias. ``api.compile`` applies the masks to the initializers, removes the neurons
physically, verifies against the masked model on ONNX Runtime and writes a self-contained output folder.
``--quick``: a narrower network and no timing.

Run: ``python examples/from_onnx.py --out build/from_onnx`` (30 s on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file
from torch import nn

from prune2deploy import api


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def export_user_model(path: Path, dim: int, hidden: int) -> None:
    """What the user did long ago: export with dynamic batch and sequence, weights in external data."""
    torch.manual_seed(0)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        Net(dim, hidden).eval(), (torch.randn(2, 8, dim),), dynamo=True, opset_version=18,
        dynamic_shapes=({0: batch, 1: seq},),
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)


def initializer_of(model: onnx.ModelProto, module: str) -> tuple[str, list[int]]:
    """The name and shape of the MatMul weight that ``module`` (a torch module path) became."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        if node.op_type == "MatMul" and module in scopes and node.input[1] in shapes:
            return node.input[1], shapes[node.input[1]]
    raise SystemExit(f"no MatMul weight of {module} in the model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/from_onnx"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="narrower network, no timing (CI)")
    args = parser.parse_args(argv)
    out: Path = args.out
    dim, hidden, fraction = (32, 64, 0.5) if args.quick else (256, 1024, 0.25)

    user = out / "user" / "model.onnx"
    export_user_model(user, dim, hidden)
    print(f"1. the user's model: {user} + {user.name}.data ({user.with_suffix('.onnx.data').stat().st_size:,} bytes)")

    rng = np.random.default_rng(0)
    drop0 = rng.choice(hidden, int(fraction * hidden), replace=False)
    drop1 = rng.choice(hidden, int(fraction * hidden), replace=False)
    keep0 = np.ones(hidden, np.float32)
    keep0[drop0] = 0
    keep1 = np.ones(hidden, np.float32)
    keep1[drop1] = 0
    onnx_name, onnx_shape = initializer_of(onnx.load(str(user), load_external_data=False), "blocks.1.up")
    masks = {
        # by torch parameter name, torch layout [out, in]
        "blocks.0.up.weight": np.repeat(keep0[:, None], dim, axis=1),
        "blocks.0.up.bias": keep0,
        # by ONNX initializer name, ONNX layout (a MatMul B: [in, out]); the bias kept its torch name
        onnx_name: np.repeat(keep1[None, :], onnx_shape[0], axis=0),
        "blocks.1.up.bias": keep1,
    }
    masks_path = out / "masks.safetensors"
    save_file(masks, str(masks_path))
    print(f"2. masks: blocks.0.up by torch name, blocks.1.up by ONNX initializer '{onnx_name}' {onnx_shape}")
    print(f"   → {masks_path}")

    options = api.CompileOptions(masks=masks_path, overwrite=True, profile=not args.quick, profile_seqs=[128],
                                 profile_budget_s=5.0)  # fmt: skip
    result = api.compile(user, out / "compiled", options)
    report = result.report
    channels = next(p["record"] for p in report["passes"] if p["pass"] == "remove-channels")
    ref, new = report["model"]["reference"], report["model"]["compiled"]
    print(f"3. compiled → {result.out_dir}/model.onnx")
    print(f"   {api.verdict_line(report['verification'])}")
    print(f"   masks applied: {report['input']['masks_applied']}; channels removed: {channels['channels_removed']}")
    print(f"   params {ref['params']:,} → {new['params']:,}, FLOPs {ref['flops']:,} → {new['flops']:,}")
    for row in report.get("speedup") or []:
        print(
            f"   CPU batch {row['batch']} seq {row['seq']}: {row['measured']:.2f}×"
            f" (95% CI {row['ci'][0]:.2f}–{row['ci'][1]:.2f}; ideal {row['ideal_speedup']:.2f}×)"
        )
    files = sorted(p.name for p in result.out_dir.iterdir())
    print(f"   output folder (self-contained, movable): {files}")
    (out / "summary.json").write_text(
        json.dumps({"verification": report["verification"]["status"], "channels_removed": channels["channels_removed"],
                    "params": [ref["params"], new["params"]], "onnx_keyed_mask": onnx_name}, indent=2) + "\n"
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
