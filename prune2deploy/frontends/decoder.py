"""Export decoder LLMs (Llama / Qwen2 / Mistral families) as one ONNX graph with a KV cache.

A no-cache graph recomputes every past token at every step, so pruning a KV head there saves FLOPs but
not what dominates generation: reading the cache. This graph takes the cache as inputs and returns the
grown cache, so fewer KV heads show up as fewer bytes read per decoded token.

The graph (names are the contract with :mod:`prune2deploy.generate`, the head/GQA passes and profiling)::

    inputs   input_ids [batch, seq] int64
             attention_mask [batch, past + seq] int64     (0 = padding; left padding for batches)
             position_ids [batch, seq] int64              (when the model's forward takes them)
             past_key_values.{i}.key / .value [batch, kv_heads_i, past, head_dim_i]
    outputs  logits [batch, seq, vocab]
             present.{i}.key / .value [batch, kv_heads_i, past + seq, head_dim_i]

One graph serves both phases: prefill is past length 0 (empty past tensors), decode is seq 1. The
exporter keeps ``past`` symbolic (the example uses past > 1) and ONNX Runtime accepts zero-length past
tensors (Concat with an empty input), which the tests check; no separate prefill graph is needed.

The export module is a shallow copy of the model whose class only swaps ``forward``: parameter names,
initializer names and ``pkg.torch.onnx.name_scopes`` are those of the model itself
(``model.layers.3.self_attn.k_proj``), with no wrapper prefix, so mask files keyed by parameter name apply.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from prune2deploy.errors import BadInputError, UnsupportedModelError
from prune2deploy.graph.dims import dim_value

__all__ = [
    "PAST_DIM",
    "TOTAL_DIM",
    "CacheLayer",
    "DecoderSignature",
    "decoder_signature",
    "export_decoder",
    "kv_cache_bytes_per_token",
]

log = logging.getLogger(__name__)

#: Symbolic dim names of the graph's past length and of past + new length.
PAST_DIM = "past"
TOTAL_DIM = "past + seq"

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bfloat16)": np.float16,  # itemsize 2; numpy has no bfloat16
    "tensor(double)": np.float64,
}
_IR_TYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
}


@dataclass(frozen=True)
class CacheLayer:
    """One decoder layer's cache as the graph declares it (a pruned layer may differ from its neighbours)."""

    index: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    kv_heads: int
    head_dim: int
    dtype: type  # numpy scalar type of the cache tensors

    @property
    def bytes_per_token(self) -> int:
        """Key plus value bytes that one token adds to this layer's cache, per sequence."""
        return 2 * self.kv_heads * self.head_dim * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class DecoderSignature:
    """Input and output names of a KV-cache decoder graph, read from the graph itself."""

    layers: tuple[CacheLayer, ...]
    vocab_size: int | None
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str | None = "position_ids"
    logits: str = "logits"

    @property
    def bytes_per_token(self) -> int:
        """KV-cache bytes per token per sequence: what each decode step reads once more."""
        return sum(layer.bytes_per_token for layer in self.layers)

    def empty_past(self, batch: int, past: int = 0, *, rng: np.random.Generator | None = None) -> dict:
        """Past feeds of length ``past``: zeros, or standard normal when ``rng`` is given (for timing)."""
        feeds = {}
        for layer in self.layers:
            shape = (batch, layer.kv_heads, past, layer.head_dim)
            for name in (layer.past_key, layer.past_value):
                if rng is None:
                    feeds[name] = np.zeros(shape, dtype=layer.dtype)
                else:
                    feeds[name] = rng.standard_normal(shape, dtype=np.float32).astype(layer.dtype)
        return feeds


def _io_from_source(source: Any) -> tuple[dict[str, tuple[list, type]], dict[str, tuple[list, type]]]:
    """(name -> (dims, numpy dtype)) for inputs and outputs of an ir.Model, ONNX file or ORT session."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadInputError(f"{path}: no such ONNX file")
        import onnx

        source = ir.from_proto(onnx.load(str(path), load_external_data=False))
    if isinstance(source, ir.Model):

        def describe(values: Sequence[ir.Value]) -> dict[str, tuple[list, type]]:
            return {
                v.name: ([dim_value(d) for d in (v.shape or [])], _IR_TYPES.get(v.dtype, np.float32)) for v in values
            }

        return describe(source.graph.inputs), describe(source.graph.outputs)
    if hasattr(source, "get_inputs") and hasattr(source, "get_outputs"):  # onnxruntime.InferenceSession

        def describe_ort(args: Sequence[Any]) -> dict[str, tuple[list, type]]:
            return {a.name: (list(a.shape), _ORT_TYPES.get(a.type, np.float32)) for a in args}

        return describe_ort(source.get_inputs()), describe_ort(source.get_outputs())
    raise BadInputError(f"cannot read a decoder signature from {type(source).__name__}")


def decoder_signature(source: Any) -> DecoderSignature:
    """Reads the cache layout from a KV-cache graph (ir.Model, ``.onnx`` path or ORT session).

    The layout comes from the ``present.{i}.key`` outputs' static dims, so it reflects a graph whose heads
    were pruned or regrouped after export.

    Raises:
        BadInputError: the graph lacks the inputs/outputs of :func:`export_decoder`, or a cache dim is
            not static.
    """
    inputs, outputs = _io_from_source(source)
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise BadInputError(f"not a KV-cache decoder graph: no input '{name}' (inputs: {sorted(inputs)})")
    layers = []
    index = 0
    while f"present.{index}.key" in outputs:
        names = (
            f"past_key_values.{index}.key",
            f"past_key_values.{index}.value",
            f"present.{index}.key",
            f"present.{index}.value",
        )
        missing = [n for n in names if n not in inputs and n not in outputs]
        if missing:
            raise BadInputError(f"not a KV-cache decoder graph: layer {index} lacks {missing}")
        dims, dtype = outputs[names[2]]
        if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
            raise BadInputError(
                f"output '{names[2]}' has shape {dims}; expected [batch, kv_heads, past + seq, head_dim] "
                "with static kv_heads and head_dim"
            )
        layers.append(CacheLayer(index, *names, kv_heads=dims[1], head_dim=dims[3], dtype=dtype))
        index += 1
    if not layers:
        raise BadInputError("not a KV-cache decoder graph: no 'present.0.key' output")
    logits = outputs.get("logits")
    vocab = logits[0][-1] if logits and logits[0] and isinstance(logits[0][-1], int) else None
    return DecoderSignature(
        layers=tuple(layers),
        vocab_size=vocab,
        position_ids="position_ids" if "position_ids" in inputs else None,
    )


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    if getter is None:
        return config
    try:
        return getter(decoder=True)
    except TypeError:
        return getter()


def kv_cache_bytes_per_token(source: Any, *, dtype_bytes: int | None = None) -> int:
    """KV-cache bytes that one token adds per sequence: 2 (K and V) x layers x kv_heads x head_dim x bytes.

    Why it matters: decoding reads the whole cache once per token, so at long context this number times
    the past length is the step's memory traffic, and it is what KV-head pruning and GQA regrouping cut.

    Args:
        source: a transformers config, a model (``.config``), an :class:`~prune2deploy.frontends.hf.HFModel`,
            or a KV-cache graph (ir.Model, ``.onnx`` path, ORT session, :class:`DecoderSignature`). A graph
            is measured from its ``present.*`` outputs, so pruned or regrouped layers count as they are.
        dtype_bytes: bytes per cache element. Default: the graph's cache dtype; for a config, its ``dtype``
            (float32 when unset); for a model, its parameters' dtype.
    """
    if isinstance(source, DecoderSignature):
        signature = source
    elif isinstance(source, (ir.Model, str, Path)) or hasattr(source, "get_outputs"):
        signature = decoder_signature(source)
    else:
        signature = None
    if signature is not None:
        if dtype_bytes is None:
            return signature.bytes_per_token
        return sum(2 * layer.kv_heads * layer.head_dim * dtype_bytes for layer in signature.layers)

    module = getattr(source, "module", None)  # HFModel
    if module is not None and hasattr(module, "config"):
        source = module
    if hasattr(source, "parameters") and hasattr(source, "config"):
        if dtype_bytes is None:
            first = next(iter(source.parameters()), None)
            dtype_bytes = first.element_size() if first is not None else 4
        source = source.config
    config = _text_config(source)
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
    except AttributeError as exc:
        raise BadInputError(f"{type(source).__name__} is not a decoder config or KV-cache graph ({exc})") from exc
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if dtype_bytes is None:
        dtype = getattr(config, "dtype", None)
        dtype_bytes = _dtype_bytes(dtype)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def _dtype_bytes(dtype: Any) -> int:
    if dtype is None:
        return 4
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


def _cache_export_module(model: Any, num_layers: int, with_positions: bool) -> Any:
    """A shallow copy of ``model`` whose forward takes flat cache tensors and returns flat present tensors.

    Subclassing instead of wrapping keeps module paths (and so name scopes and initializer names) identical
    to the model's own. The cache is built without the config, so every layer is a plain full-length
    ``DynamicLayer``: sliding-window models still mask by window (the model's mask function reads the
    config) but keep the whole cache, so present is always past + seq long.
    """
    from transformers import DynamicCache

    base = type(model)

    def forward(self, input_ids, attention_mask, *rest):
        position_ids, past = (rest[0], rest[1:]) if with_positions else (None, rest)
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
        kwargs = {"position_ids": position_ids} if with_positions else {}
        out = base.forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
            **kwargs,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

    if with_positions:
        # torch.export keys dynamic_shapes by the forward's parameter names: give it a fixed signature.
        def forward_pos(self, input_ids, attention_mask, position_ids, *past):
            return forward(self, input_ids, attention_mask, position_ids, *past)

        method = forward_pos
    else:

        def forward_nopos(self, input_ids, attention_mask, *past):
            return forward(self, input_ids, attention_mask, *past)

        method = forward_nopos
    cls = type(f"{base.__name__}WithKVCache", (base,), {"forward": method})
    clone = copy.copy(model)
    clone.__class__ = cls
    return clone


def export_decoder(
    model: Any,
    path: Path | str | None = None,
    *,
    example_batch: int = 2,
    example_seq: int = 3,
    example_past: int = 4,
    opset_version: int = 18,
    optimize: bool = True,
) -> ir.Model:
    """Exports a transformers causal LM as one KV-cache graph (see the module docstring for its I/O).

    Args:
        model: a transformers ``*ForCausalLM`` (Llama, Qwen2, Mistral and other ``DynamicCache`` users) or
            an :class:`~prune2deploy.frontends.hf.HFModel` holding one. It is not modified.
        path: where to save the graph (weights inline below 2 GB, else ``<name>.data`` beside it).
        example_batch, example_seq, example_past: sizes of the tracing example. Each must be ≥ 2: torch.export
            specialises dims whose example is 0 or 1, which would fix batch, sequence or past length.
        opset_version: ONNX opset.
        optimize: run the exporter's optimizer (constant folding, de-duplicated shape constants).

    Returns:
        The graph as an ``onnx_ir.Model`` with ``pkg.torch.onnx.name_scopes`` metadata on its nodes.

    Raises:
        UnsupportedModelError: the model has no decoder config or torch.export fails on it.
        BadInputError: an example size is below 2.
    """
    import torch

    module = getattr(model, "module", model)  # HFModel or the module itself
    if not hasattr(module, "config") or not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(f"{type(module).__name__} is not a transformers model (no .config)")
    if min(example_batch, example_seq, example_past) < 2:
        raise BadInputError(
            "example_batch, example_seq and example_past must each be ≥ 2 "
            "(torch.export specialises dims whose example size is 0 or 1)"
        )
    dims = _decoder_dims(module)
    with_positions = "position_ids" in inspect.signature(type(module).forward).parameters
    trace = _trace_inputs(module, dims, (example_batch, example_seq, example_past), with_positions)
    clone = _cache_export_module(module, dims.num_layers, with_positions)
    start = time.perf_counter()
    onnx_model = _run_exporter(module, clone, trace, opset_version=opset_version, optimize=optimize)
    _name_total_dim(onnx_model)
    log.info(
        "exported %s with KV cache in %.1f s (%d layers, %d kv heads x %d)",
        type(module).__name__,
        time.perf_counter() - start,
        dims.num_layers,
        dims.kv_heads,
        dims.head_dim,
    )
    if path is not None:
        _save_model(onnx_model, path)
    return onnx_model


@dataclass(frozen=True)
class _DecoderDims:
    """The config sizes the tracing example needs: one cache tensor pair per layer, tokens below vocab."""

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab: int


def _decoder_dims(module: Any) -> _DecoderDims:
    """Reads layer count, KV heads, head size and vocabulary from the model's (text) config.

    Configs without ``num_key_value_heads`` are multi-head attention (one KV head per query head); those
    without ``head_dim`` split the hidden size evenly across heads.
    """
    config = _text_config(module.config)
    try:
        num_layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        vocab = int(config.vocab_size)
    except AttributeError as exc:
        raise UnsupportedModelError(f"{type(module).__name__}: config is not a decoder config ({exc})") from exc
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return _DecoderDims(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab)


@dataclass
class _TraceInputs:
    """The tracing example and how the exporter should name and generalise its dims."""

    args: tuple
    dynamic_shapes: dict[str, Any]
    input_names: list[str]
    output_names: list[str]


def _trace_inputs(module: Any, dims: _DecoderDims, sizes: tuple[int, int, int], with_positions: bool) -> _TraceInputs:
    """A seeded example of ``sizes`` = (batch, seq, past) and the dynamic dims that free it.

    The past tensors take the module's dtype so that a half-precision model traces in half precision.
    """
    import torch

    dtype = next(module.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    b, s, p = sizes
    args: list[torch.Tensor] = [
        torch.randint(0, dims.vocab, (b, s), generator=gen),
        torch.ones(b, p + s, dtype=torch.long),
    ]
    if with_positions:
        args.append(torch.arange(p, p + s).expand(b, s).contiguous())
    past_names = [f"past_key_values.{i}.{kind}" for i in range(dims.num_layers) for kind in ("key", "value")]
    args += [torch.randn(b, dims.kv_heads, p, dims.head_dim, generator=gen).to(dtype) for _ in past_names]

    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    past = torch.export.Dim(PAST_DIM, min=0)
    # past + seq cannot be written as a derived Dim of two Dims; a free dim is accepted and renamed below.
    total = torch.export.Dim("total")
    dynamic_shapes: dict[str, Any] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}}
    if with_positions:
        dynamic_shapes["position_ids"] = {0: batch, 1: seq}
    dynamic_shapes["past"] = tuple({0: batch, 2: past} for _ in past_names)
    input_names = ["input_ids", "attention_mask", *(["position_ids"] if with_positions else []), *past_names]
    output_names = ["logits", *(n.replace("past_key_values", "present") for n in past_names)]
    return _TraceInputs(tuple(args), dynamic_shapes, input_names, output_names)


def _run_exporter(module: Any, clone: Any, trace: _TraceInputs, *, opset_version: int, optimize: bool) -> ir.Model:
    """Runs torch's dynamo exporter on the cache module; any failure becomes an UnsupportedModelError
    naming the model, since an export failure means this architecture is not supported as it is."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            # "axis name X will not be used": emitted for every Dim that several inputs share
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
            program = torch.onnx.export(
                clone,
                trace.args,
                dynamo=True,
                opset_version=opset_version,
                dynamic_shapes=trace.dynamic_shapes,
                input_names=trace.input_names,
                output_names=trace.output_names,
                optimize=optimize,
                verbose=False,
            )
    except Exception as exc:
        raise UnsupportedModelError(
            f"{type(module).__name__}: KV-cache export failed ({type(exc).__name__}: {str(exc)[:2000]})"
        ) from exc
    return program.model


def _name_total_dim(model: ir.Model) -> None:
    """Gives attention_mask's length the outputs' symbol ``past + seq`` so feeds can override it by name."""
    for value in model.graph.inputs:
        if value.name == "attention_mask" and value.shape is not None and len(value.shape) == 2:
            value.shape = ir.Shape([value.shape[0], ir.SymbolicDim(TOTAL_DIM)])


def _save_model(model: ir.Model, path: Path | str) -> Path:
    """Saves a graph, with external data beside it when the weights pass protobuf's 2 GB limit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes > 1_800_000_000:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)
    return path
