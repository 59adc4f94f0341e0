"""Kernels of a model from its config alone: predict a 7B or 70B model, or a pruned plan, without weights.

Config arithmetic, not a traced graph: an HF ``config.json`` fixes every GEMM's M, N and K, the attention
shapes and the KV-cache size, which is all the cost model reads; building a 70B module even on the meta
device and tracing it takes minutes and depends on each architecture's modelling code, while this takes
milliseconds. ``tests/profiling/test_shape_only.py`` checks the arithmetic against the exported-graph
pricer (:func:`prune2deploy.profiling.costmodel.kernels_from_cost`) on a tiny Llama: same GEMM FLOPs and
weight bytes.

Families: decoders (Llama, Mistral, Qwen2, Gemma, Phi-3 and other ``*ForCausalLM`` with gated or plain
MLPs, GQA), BERT-style encoders, and ResNets (HF ``resnet`` configs, torchvision's ResNet-50 by default).
Per-layer widths come from a pruning plan (:class:`prune2deploy.pruning.plan.Plan` or its dict form):
kept MLP channels, query and kv heads per layer, dropped layers, kept hidden channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune2deploy.errors import BadInputError
from prune2deploy.frontends.hf_config import check_config_numbers
from prune2deploy.limits import MAX_WIDTH, MODEL_NUMBERS, check_whole
from prune2deploy.profiling.costmodel import ENGINES, Kernel
from prune2deploy.profiling.roofline import PRECISIONS

__all__ = ["LayerShape", "ModelShape", "config_rows", "load_config", "model_kernels", "shape_from_config"]

_GATED_ACTS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_tanh")
_ENCODERS = ("bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta", "deberta-v2")


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a transformer: widths per layer, head size, vocabulary, family."""

    family: str  # "decoder", "encoder" or "resnet"
    hidden: int
    head_dim: int
    vocab: int
    layers: tuple[LayerShape, ...]
    gated: bool = True
    resnet: dict[str, Any] | None = None

    @property
    def params(self) -> int:
        """Weights of the GEMMs and embeddings (norms and biases left out: < 0.1%)."""
        if self.family == "resnet":
            return sum(k.n * k.k for k in _resnet_convs(self.resnet or {}, 1, 1.0))
        total = self.vocab * self.hidden * (2 if self.family == "decoder" else 1)
        for layer in self.layers:
            qkv = self.hidden * self.head_dim * (layer.heads + 2 * layer.kv_heads)
            total += qkv + layer.heads * self.head_dim * self.hidden
            total += self.hidden * layer.intermediate * (3 if self.gated else 2)
        return total


def load_config(source: Path | str | dict) -> dict[str, Any]:
    """An HF config as a dict, from a dict, a ``config.json`` or a folder holding one (no weights needed).

    A file is read by :func:`prune2deploy.frontends.hf_config.read_config_json` (a regular file of at most
    16 MiB of UTF-8 JSON, an object); its numbers are checked by :func:`shape_from_config`.
    """
    from prune2deploy.frontends.hf_config import read_config_json

    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise BadInputError(f"{path}: no such config; pass an HF config.json or a folder that holds one")
    return read_config_json(path, strict=False)


def _get(config: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def _number(config: dict[str, Any], where: str, *names: str) -> int | None:
    """The first of ``names`` present, as a whole number from 1 to :data:`prune2deploy.limits.MAX_WIDTH`
    (names outside :data:`MODEL_NUMBERS`, such as GPT-2's ``n_embd``, get that generic range)."""
    for name in names:
        if config.get(name) is not None:
            low, high, why = MODEL_NUMBERS.get(name, (1, MAX_WIDTH, "no model is wider"))
            return check_whole(config[name], name=name, low=low, high=high, where=where, why=why)
    return None


def _head_dim(hidden: int, heads: int, where: str) -> int:
    if hidden % heads:
        raise BadInputError(
            f"{where}: 'hidden_size' {hidden} is not a multiple of 'num_attention_heads' {heads}; give 'head_dim' "
            "or fix one of them"
        )
    return hidden // heads


def _kept(selection: Any) -> int | None:
    if selection is None:
        return None
    kept = selection.get("kept") if isinstance(selection, dict) else getattr(selection, "kept", None)
    return None if kept is None else len(kept)


def shape_from_config(config: dict[str, Any], plan: Any = None, *, where: str = "config") -> ModelShape:
    """The widths of ``config``'s model, narrowed by ``plan`` (kept channels, heads, dropped layers).

    Every width is a whole number within :data:`prune2deploy.limits.MODEL_NUMBERS` (a config asking for
    10^12 layers would otherwise build a list of 10^12 layers), heads divide the hidden size unless
    ``head_dim`` is given, and key/value heads divide the query heads.

    Raises:
        BadInputError: The config lacks a width the family needs, or one is out of range (names the key).
    """
    check_config_numbers(config, where=where)
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "resnet" or str((config.get("architectures") or [""])[0]).lower().startswith("resnet"):
        return ModelShape("resnet", 0, 0, 0, (), resnet=config)
    family = "encoder" if model_type in _ENCODERS else "decoder"
    hidden = _number(config, where, "hidden_size", "n_embd", "d_model")
    heads = _number(config, where, "num_attention_heads", "n_head")
    n_layers = _number(config, where, "num_hidden_layers", "n_layer", "num_layers")
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_hidden_layers", n_layers)):
        if value is None:
            raise BadInputError(f"{where} has no '{key}'; shape-only prediction needs it")
    kv_heads = _number(config, where, "num_key_value_heads") or heads
    head_dim = _number(config, where, "head_dim") or _head_dim(hidden, heads, where)
    if heads % kv_heads:
        raise BadInputError(
            f"{where}: 'num_attention_heads' {heads} is not a multiple of 'num_key_value_heads' {kv_heads}; "
            "each key/value head serves a whole group of query heads"
        )
    intermediate = _number(config, where, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    act = str(_get(config, "hidden_act", "activation_function", default="gelu")).lower()
    gated = family == "decoder" and act in _GATED_ACTS
    vocab = _number(config, where, "vocab_size") or 32000
    layers = [LayerShape(heads, kv_heads, intermediate) for _ in range(n_layers)]
    if plan is not None:
        get = (lambda k: plan.get(k)) if isinstance(plan, dict) else (lambda k: getattr(plan, k, None))
        for choice in get("layers") or []:
            index = choice["index"] if isinstance(choice, dict) else choice.index
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(layers):
                raise BadInputError(
                    f"the plan chooses widths for layer {index!r}, but {where} has {len(layers)} layers "
                    f"(0..{len(layers) - 1}); the plan was made for another model"
                )
            pick = (lambda k, c=choice: c.get(k)) if isinstance(choice, dict) else (lambda k, c=choice: getattr(c, k))
            old = layers[index]
            layers[index] = LayerShape(
                _kept(pick("heads")) or old.heads,
                _kept(pick("kv_heads")) or old.kv_heads,
                _kept(pick("mlp")) or old.intermediate,
            )
        dropped = set(get("dropped_layers") or [])
        layers = [layer for i, layer in enumerate(layers) if i not in dropped]
        hidden = _kept(get("hidden")) or hidden
    return ModelShape(family, hidden, head_dim, vocab, tuple(layers), gated=gated)


def _gemm(name: str, group: str, m: int, n: int, k: int, e: float, *, read: bool = True) -> Kernel:
    moved = (m * k * (1 if read else 0) + n * k + m * n) * e
    return Kernel(name, "gemm", group, 2.0 * m * n * k, moved, m, n, k, weight_bytes=n * k * e)


def _pointwise(name: str, group: str, elements: float, e: float, *, tensors: int = 2) -> Kernel:
    return Kernel(name, "pointwise", group, elements, elements * tensors * e)


def model_kernels(
    shape: ModelShape,
    *,
    batch: int = 1,
    seq: int = 128,
    past: int = 0,
    decode: bool = False,
    precision: str = "fp16",
    engine: str = "tensorrt",
    sparse: bool = False,
) -> list[Kernel]:
    """Kernels of one forward pass: a prefill of ``seq`` tokens, or (``decode``) one token after ``past``.

    ``sparse`` marks every weight GEMM 2:4 (what ``sparsify-nm`` produces). For ResNets ``seq`` is the
    image side (224 by default when ``seq`` is 128).
    """
    if shape.family == "resnet":
        side = 224 if seq == 128 else seq
        return _resnet_kernels(shape.resnet or {}, batch, side, PRECISIONS[precision], engine, sparse)
    e = PRECISIONS[precision]
    kv_e = 1.0 if precision == "fp8" else (4.0 if precision in ("fp32", "tf32") else 2.0)
    profile = ENGINES[engine]
    tokens = 1 if decode else seq
    context = past + tokens
    m = batch * tokens
    h, d = shape.hidden, shape.head_dim
    kernels: list[Kernel] = [Kernel("embed", "data", "embedding", 0, 2 * m * h * e)]
    for i, layer in enumerate(shape.layers):
        p = f"layers.{i}"
        q_n, kv_n = layer.heads * d, layer.kv_heads * d
        kernels.append(Kernel(f"{p}.norm1", "norm", "norm", 5 * m * h, 2 * m * h * e + h * e))
        if profile.fuse_pointwise:  # TensorRT(-LLM) fuses Q, K and V into one GEMM
            kernels.append(_gemm(f"{p}.qkv", "attention", m, q_n + 2 * kv_n, h, e))
        else:
            kernels += [_gemm(f"{p}.{n}", "attention", m, w, h, e) for n, w in (("q", q_n), ("k", kv_n), ("v", kv_n))]
        if shape.family == "decoder" and engine in ("torch", "llama.cpp"):  # unfused rotary (4 ops)
            kernels += [_pointwise(f"{p}.rotary{j}", "attention", m * (q_n + kv_n), e) for j in range(4)]
        causal = 0.5 if shape.family == "decoder" and not decode else 1.0
        flops = 4.0 * batch * layer.heads * tokens * context * d * causal
        traffic = (2 * m * q_n) * e + (2 * m * kv_n) * kv_e + (2 * batch * context * kv_n) * kv_e
        kernels.append(Kernel(f"{p}.attention", "attention", "attention", flops, traffic))
        kernels.append(_gemm(f"{p}.o", "attention", m, h, q_n, e))
        if not profile.fuse_pointwise:
            kernels.append(_pointwise(f"{p}.residual1", "norm", m * h, e, tensors=3))
        kernels.append(Kernel(f"{p}.norm2", "norm", "norm", 5 * m * h, 2 * m * h * e + h * e))
        inter = layer.intermediate
        if shape.gated and profile.fuse_pointwise:
            kernels.append(_gemm(f"{p}.gate_up", "mlp", m, 2 * inter, h, e))
            # TensorRT-LLM v0.5 runs SwiGLU as its own kernel after the fused gate/up GEMM (its perf notes)
            kernels.append(_pointwise(f"{p}.swiglu", "mlp", m * inter, e, tensors=3))
        elif shape.gated:
            kernels += [_gemm(f"{p}.gate", "mlp", m, inter, h, e), _gemm(f"{p}.up", "mlp", m, inter, h, e)]
            kernels += [
                _pointwise(f"{p}.silu", "mlp", m * inter, e),
                _pointwise(f"{p}.mul", "mlp", m * inter, e, tensors=3),
            ]
        else:
            kernels.append(_gemm(f"{p}.up", "mlp", m, inter, h, e))
            if not profile.fuse_pointwise:
                kernels.append(_pointwise(f"{p}.act", "mlp", m * inter, e))
        kernels.append(_gemm(f"{p}.down", "mlp", m, h, inter, e))
        if not profile.fuse_pointwise:
            kernels.append(_pointwise(f"{p}.residual2", "norm", m * h, e, tensors=3))
    if shape.family == "decoder":
        kernels.append(Kernel("final_norm", "norm", "norm", 5 * batch * h, 2 * batch * h * e))
        # Only the last position's logits (TensorRT-LLM's default; HF generate's logits_to_keep=1).
        kernels.append(_gemm("lm_head", "lm_head", batch, shape.vocab, h, e))
    if sparse:
        kernels = [k if k.kind != "gemm" or k.group == "lm_head" else _sparse(k) for k in kernels]
    return kernels


def _sparse(kernel: Kernel) -> Kernel:
    from dataclasses import replace

    return replace(kernel, sparse=True)


# -- ResNets --------------------------------------------------------------------------------------------------


def _conv(name: str, batch: int, cin: int, cout: int, size_in: int, ksize: int, stride: int, e: float) -> Kernel:
    size_out = math.ceil(size_in / stride)
    m, n, k = batch * size_out * size_out, cout, cin * ksize * ksize
    moved = (batch * cin * size_in * size_in + n * k + m * n) * e
    return Kernel(name, "conv", "conv", 2.0 * m * n * k, moved, m, n, k, weight_bytes=n * k * e)


def _resnet_convs(config: dict, batch: int, e: float, side: int = 224) -> list[Kernel]:
    """Convs of a bottleneck ResNet (v1.5: stride on the 3x3) from an HF ResNetConfig (ResNet-50 default)."""
    depths = config.get("depths", [3, 4, 6, 3])
    widths = config.get("hidden_sizes", [256, 512, 1024, 2048])
    stem = config.get("embedding_size", 64)
    convs = [_conv("stem", batch, config.get("num_channels", 3), stem, side, 7, 2, e)]
    size = math.ceil(math.ceil(side / 2) / 2)  # stem stride 2, max-pool stride 2
    cin = stem
    for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        mid = width // 4
        for block in range(depth):
            stride = 2 if block == 0 and stage > 0 else 1
            p = f"stage{stage}.{block}"
            if block == 0:
                convs.append(_conv(f"{p}.downsample", batch, cin, width, size, 1, stride, e))
            convs.append(_conv(f"{p}.conv1", batch, cin, mid, size, 1, 1, e))
            convs.append(_conv(f"{p}.conv2", batch, mid, mid, size, 3, stride, e))
            size = math.ceil(size / stride)
            convs.append(_conv(f"{p}.conv3", batch, mid, width, size, 1, 1, e))
            cin = width
    return convs


def _resnet_kernels(config: dict, batch: int, side: int, e: float, engine: str, sparse: bool) -> list[Kernel]:
    profile = ENGINES[engine]
    kernels: list[Kernel] = []
    for conv in _resnet_convs(config, batch, e, side):
        kernels.append(_sparse(conv) if sparse and conv.name != "stem" else conv)
        if not profile.fuse_pointwise:  # BatchNorm folds into the conv everywhere but eager; ReLU/Add do not
            out = conv.m * conv.n
            if engine == "torch":
                kernels.append(_pointwise(f"{conv.name}.bn", "conv", out, e))
            kernels.append(_pointwise(f"{conv.name}.relu", "conv", out, e))
    widths = config.get("hidden_sizes", [256, 512, 1024, 2048])
    kernels.append(Kernel("pool", "pointwise", "head", batch * widths[-1] * 49, batch * widths[-1] * 50 * e))
    kernels.append(_gemm("fc", "head", batch, config.get("num_labels", 1000), widths[-1], e))
    return kernels


def _check_within_positions(config: dict[str, Any], tokens: int, *, where: str) -> None:
    """A prefill (or the decode step's position) beyond the config's ``max_position_embeddings``/``n_positions``
    is a latency of a run the model cannot make (its position table or rotary range ends there).

    Raises:
        BadInputError: naming the config, the length asked for and the bound.
    """
    from prune2deploy.errors import BadInputError

    bound = _positions(config)
    if bound is not None and tokens > bound:
        raise BadInputError(
            f"{where}: the prediction asks for position {tokens}, beyond the model's positions "
            f"(max_position_embeddings / n_positions = {bound}); give --seq (or --past + 1 with --decode) of at "
            f"most {bound}"
        )


def _positions(config: dict[str, Any]) -> int | None:
    """The config's position bound (``max_position_embeddings`` or GPT-2's ``n_positions``), if it states one."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# -- rows --------------------------------------------------------------------------------------------------


def config_rows(
    config: Path | str | dict,
    *,
    plan: Any = None,
    gpus: list[str] | None = None,
    precision: str = "fp16",
    batch: int = 1,
    seq: int | None = None,
    engine: str = "tensorrt",
    decode: bool = False,
    past: int = 0,
) -> list[dict[str, Any]]:
    """Prediction rows (:mod:`prune2deploy.profiling.prediction`'s schema, ``source=config``) of a config's
    prefill of ``seq`` tokens or decode step after ``past``, per GPU, with tokens/s and (decoders, decode) the
    batch at which the step turns compute-bound. ``plan``: a :class:`~prune2deploy.pruning.plan.Plan` or dict;
    with one, the unpruned config is the reference (``reference_ms``, ``speedup``, ``ideal_speedup``, ``cause``)."""
    from prune2deploy.profiling.costmodel import compute_bound_batch, explain_gain, price
    from prune2deploy.profiling.prediction import row_from_prediction, target_gpus

    data = load_config(config)
    where = "config" if isinstance(config, dict) else str(config)
    shape = shape_from_config(data, plan, where=where)
    if seq is None:  # 128 tokens, or the model's positions when fewer
        seq = min(128, _positions(data) or 128) if shape.family != "resnet" else 128
    if shape.family != "resnet":
        _check_within_positions(data, past + 1 if decode else seq, where=where)

    def build(b: int, of: ModelShape = shape) -> list[Kernel]:
        return model_kernels(of, batch=b, seq=seq, past=past, decode=decode, precision=precision, engine=engine)

    kernels = build(batch)
    # With a plan, the unpruned config is the reference: speedup, ideal and why a gain is lost (``cause``).
    reference = build(batch, shape_from_config(data, where=where)) if plan is not None else None
    tokens = batch * (1 if decode else seq)
    rows = []
    for spec in target_gpus(gpus, precision):
        pred = price(kernels, spec, precision=precision, engine=engine)
        row = row_from_prediction(
            pred, gpu=spec.key, engine=engine, precision=precision, batch=batch, seq=None if decode else seq,
            source="config", mode="decode" if decode else "prefill", past=past if decode else None,
            params=shape.params, gflops=sum(k.flops for k in kernels) / 1e9,
        )  # fmt: skip
        if reference is not None:
            ref = price(reference, spec, precision=precision, engine=engine)
            ref_flops, new_flops = sum(k.flops for k in reference), sum(k.flops for k in kernels)
            row.update(
                reference_ms=ref.latency_ms, reference_lower_bound_ms=ref.lower_bound_ms,
                reference_gflops=ref_flops / 1e9, speedup=ref.latency_ms / pred.latency_ms,
                lower_bound_speedup=ref.lower_bound_ms / pred.lower_bound_ms if pred.lower_bound_ms else None,
                ideal_speedup=ref_flops / new_flops if new_flops else None, fusion_level="as given",
                cause=explain_gain(reference, kernels, spec, precision=precision, engine=engine),
            )  # fmt: skip
        row["tokens_per_s"] = tokens * 1000 / pred.latency_ms if shape.family != "resnet" else None
        if decode and shape.family == "decoder":
            row["compute_bound_batch"] = compute_bound_batch(build, spec, precision=precision, engine=engine)
        rows.append(row)
    return rows
