"""Head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?") on a BERT encoder →
masks → ``remove-heads`` → cosine of the sentence embeddings against the dense model.

The workflow of a user with their own pruner: the importance of head h is E|∂L/∂ξ_h|, the gradient of a
loss with respect to a gate ξ_h = 1 on the head's output (Michel et al., eq. 3), normalised per layer; the
least important heads are masked globally (at least one head stays per layer). The loss here is the one
the bundled all-MiniLM-L6-v2 was trained with: an in-batch contrastive loss (MultipleNegativesRanking),
with each evaluation-text sentence paired with a copy missing a fifth of its words. prune2deploy's own
``michel`` criterion needs a next-token loss (causal LMs), which is why the example computes it itself.

The masks are a safetensors file keyed by torch parameter name (zero the head's query/key/value rows and
its columns of ``attention.output.dense``); ``api.compile`` removes those heads physically (exact: verified
against the masked model) and the example compares mean-pooled embeddings of the compiled model with the
dense model's on the bundled evaluation text.

``--quick``: the same on the same model with fewer scoring sentences and no timing (MiniLM is small).

Run: ``python examples/sixteen_heads.py --out build/heads`` (about 4 minutes on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py beside this file

import torch
from _common import bundled_folder, evaluation_text, say
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

from prune2deploy import api
from prune2deploy.quality import encoder_quality


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.split()) >= 6]


def head_importance(model, tokenizer, texts: list[str], batch: int = 8) -> torch.Tensor:
    """|∂L/∂ξ| per (layer, head), summed over batches and normalised per layer (L2), as Michel et al. do."""
    config = model.config
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    gates = torch.ones(config.num_hidden_layers, heads, requires_grad=True)
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        # the input of attention.output.dense is the heads' outputs side by side: gate each head's slice
        def gate(_module, inputs, i=i):
            return (inputs[0] * gates[i].repeat_interleave(dim),)

        hooks.append(layer.attention.output.dense.register_forward_pre_hook(gate))
    rng = random.Random(0)
    importance = torch.zeros_like(gates)
    try:
        for start in range(0, len(texts), batch):
            anchors = texts[start : start + batch]
            if len(anchors) < 2:
                continue
            positives = [" ".join(w for w in s.split() if rng.random() > 0.2) for s in anchors]
            a, p = embed(model, tokenizer, anchors), embed(model, tokenizer, positives)
            scores = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(p, dim=1).T
            loss = torch.nn.functional.cross_entropy(scores * 20.0, torch.arange(len(anchors)))
            (grad,) = torch.autograd.grad(loss, gates)
            importance += grad.abs()
    finally:
        for hook in hooks:
            hook.remove()
    return importance / importance.norm(dim=1, keepdim=True).clamp_min(1e-12)


def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled token embeddings (sentence-transformers' pooling for this model)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


def head_masks(model, removed: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """0/1 masks in each parameter's own layout: the head's q/k/v rows and its attention.output.dense columns."""
    dim = model.config.hidden_size // model.config.num_attention_heads
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for layer, head in removed:
        rows = slice(head * dim, (head + 1) * dim)
        prefix = f"encoder.layer.{layer}.attention."
        for proj in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                name = f"{prefix}self.{proj}.{kind}"
                masks.setdefault(name, torch.ones_like(params[name]))[rows] = 0
        name = prefix + "output.dense.weight"
        masks.setdefault(name, torch.ones_like(params[name]))[:, rows] = 0
    return {k: v.contiguous() for k, v in masks.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/sixteen_heads"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer scoring sentences, no timing (CI)")
    parser.add_argument("--heads", type=float, default=0.25, help="fraction of all heads to remove")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    folder = bundled_folder("minilm-l6")
    model, tokenizer = AutoModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))
    texts = sentences(evaluation_text())
    scoring = texts[: 16 if args.quick else 64]

    print(f"1. head importance (Michel et al.) of MiniLM-L6 on {len(scoring)} sentences")
    importance = head_importance(model, tokenizer, scoring)
    layers, heads = importance.shape
    order = sorted((float(importance[i, h]), i, h) for i in range(layers) for h in range(heads))
    left = {i: heads for i in range(layers)}
    removed = []
    for _, i, h in order:
        if len(removed) == round(args.heads * layers * heads):
            break
        if left[i] > 1:
            removed.append((i, h))
            left[i] -= 1
    masks_path = out / "head_masks.safetensors"
    save_file(head_masks(model, removed), str(masks_path))
    print(f"   masking {len(removed)} of {layers * heads} heads; heads left per layer: {list(left.values())}")
    print(f"   → {masks_path}")

    print("2. compile with the masks (remove-heads)")
    timing = {"profile": not args.quick, "profile_batches": [1], "profile_seqs": [128], "profile_budget_s": 10.0}
    options = api.CompileOptions(masks=masks_path, overwrite=True, **timing)
    compiled = api.compile("minilm-l6", out / "compiled", options, progress=say)
    report = compiled.report
    record = next(p["record"] for p in report["passes"] if p["pass"] == "remove-heads")
    print(f"   {api.verdict_line(report['verification'])}")
    print(f"   remove-heads: {record.get('heads_removed')} heads removed")
    ref, new = report["model"]["reference"], report["model"]["compiled"]
    print(f"   params {ref['params']:,} → {new['params']:,}, FLOPs {ref['flops']:,} → {new['flops']:,}")
    for row in report.get("speedup") or []:
        print(
            f"   CPU batch {row['batch']} seq {row['seq']}: {row['measured']:.2f}×"
            f" (95% CI {row['ci'][0]:.2f}–{row['ci'][1]:.2f}; ideal {row['ideal_speedup']:.2f}×)"
        )

    print("3. embeddings against the dense model (cosine of mean-pooled embeddings, evaluation text)")
    dense = api.compile("minilm-l6", out / "dense", api.CompileOptions(overwrite=True, profile=False), progress=say)
    quality = encoder_quality(dense.out_dir / "model.onnx", compiled.out_dir / "model.onnx", tokenizer=tokenizer)
    print(f"   cosine mean {quality.cosine_mean:.4f}, min {quality.cosine_min:.4f} over {quality.sentences} sentences")
    summary = {
        "heads_masked": removed,
        "heads_removed": record.get("heads_removed"),
        "verification": report["verification"]["status"],
        "params": [ref["params"], new["params"]],
        "cosine_vs_dense": quality.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\noutputs: {compiled.out_dir}/model.onnx (report.json, report.html), {masks_path}, {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
