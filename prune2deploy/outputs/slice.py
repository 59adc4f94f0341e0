"""Physically slice a masked transformers causal LM: zero heads and zero MLP neurons leave the tensors.

The ONNX passes make pruning physical in the graph; deployment runtimes that take a transformers folder
(vLLM, TensorRT-LLM and llama.cpp converters) or that we build a KV-cache decoder for need the same in
torch. This is the torch side, with the same exactness rule as the passes: a unit goes only when its
contribution is zero for every input.

- MLP neuron ``j`` (gate/up/down, SwiGLU): gone when ``down_proj[:, j]`` is zero, or when ``gate_proj[j]``
  (and its bias) is zero and the activation maps 0 to 0, or when ``up_proj[j]`` (and its bias) is zero.
- Query head ``h``: gone when its ``o_proj`` columns are zero, or when the value head it reads is zero
  (weights and bias). Zero *query* rows are not enough: softmax of zero scores averages V, it is not 0.
- kv head: gone when every query head reading it is gone.

transformers repeats each kv head to the same number of query heads (``num_key_value_groups``), so a
layer whose groups would keep different numbers of query heads keeps some zero heads to even them out
(still exact: they add zero); the result says where. Each layer keeps its own widths; ``uniform`` says
whether a transformers config (one width for all layers) can describe the result.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from prune2deploy.errors import UnsupportedModelError

__all__ = [
    "LayerWidths",
    "SliceResult",
    "attention_adds_zero",
    "dead_neurons",
    "mlp_adds_zero",
    "restricted_linear",
    "slice_causal_lm",
    "text_config",
]

log = logging.getLogger(__name__)

#: Activations with act(0) == 0, so a zero gate row makes its neuron zero.
_ZERO_AT_ZERO = {"silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "quick_gelu"}


@dataclass(frozen=True)
class LayerWidths:
    """What one decoder layer keeps."""

    index: int
    num_heads: int
    kv_heads: int
    intermediate: int


@dataclass
class SliceResult:
    """A physically smaller copy of the model and what each layer kept."""

    module: Any  # the sliced transformers model (the input is not modified)
    head_dim: int
    dense: LayerWidths  # widths before slicing (the config's)
    layers: list[LayerWidths]
    padded: dict[str, str] = field(default_factory=dict)  # where zero heads were kept, and why

    @property
    def uniform(self) -> bool:
        """Whether every layer has the same widths (a transformers config can then describe the model)."""
        first = self.layers[0]
        return all((w.num_heads, w.kv_heads, w.intermediate) == (first.num_heads, first.kv_heads, first.intermediate)
                   for w in self.layers)  # fmt: skip

    @property
    def changed(self) -> bool:
        return any(
            (w.num_heads, w.kv_heads, w.intermediate)
            != (self.dense.num_heads, self.dense.kv_heads, self.dense.intermediate)
            for w in self.layers
        )

    def nonuniform_layers(self) -> dict[str, dict[str, int]]:
        """Layers whose widths differ from layer 0's: name → widths (for a message that names them)."""
        first = self.layers[0]
        return {
            f"model.layers.{w.index}": {
                "num_heads": w.num_heads,
                "kv_heads": w.kv_heads,
                "intermediate": w.intermediate,
            }
            for w in self.layers
            if (w.num_heads, w.kv_heads, w.intermediate) != (first.num_heads, first.kv_heads, first.intermediate)
        }

    def nonuniform_reason(self) -> str:
        """Why no transformers config (one width per kind for all layers) describes this model; '' when one does."""
        if self.uniform:
            return ""
        layers = self.nonuniform_layers()
        return (
            f"per-layer widths differ ({len(layers)} layers differ from layer 0: {', '.join(layers)}); "
            f"{type(self.module.config).__name__} has one num_attention_heads / num_key_value_heads / "
            "intermediate_size for all layers, so no transformers config can describe this model"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "head_dim": self.head_dim,
            "dense": asdict(self.dense),
            "layers": [asdict(w) for w in self.layers],
            "uniform": self.uniform,
            "padded": dict(self.padded),
        }


#: Tensors at least this large are shared between the masked module and its sliced copy (the vocabulary
#: embedding and lm_head, 0.5–2 GB at 1B–8B; an 8B MLP projection, 117 MB in bf16); smaller ones are copied.
#: When slicing consumes the masked module, its decoder layers' tensors are copied whatever their size:
#: shared, they would keep its checkpoint pages resident until slicing ends (13 GB of the 8B's 16 GB).
_SHARE_MIN_BYTES = 64 << 20


def _is_zero(*tensors: Any) -> bool:
    return all(t is None or not bool(t.any()) for t in tensors)


def _decoder_layers(module: Any) -> list[Any]:
    inner = getattr(module, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(module).__name__}: physical slicing supports Llama-style causal LMs (model.layers[i] with "
            "self_attn.q/k/v/o_proj and mlp.gate/up/down_proj: Llama, Qwen2, Mistral, SmolLM)"
        )
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
            raise UnsupportedModelError(f"{type(module).__name__}: layer {i} has no q/k/v/o_proj self-attention")
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise UnsupportedModelError(f"{type(module).__name__}: layer {i} has no gate/up/down_proj MLP")
    return list(layers)


def restricted_linear(old: Any, rows: Any | None = None, cols: Any | None = None) -> Any:
    """A new nn.Linear holding ``old``'s weight restricted to ``rows`` (outputs) and ``cols`` (inputs).

    Index tensors may also reorder (the regrouping's query-head permutation). A new module, never an
    in-place change: ``old`` may be the masked module's own (slicing shares what it leaves unchanged)."""
    import torch

    weight = old.weight.detach()
    bias = old.bias.detach() if old.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _head_plan(attn: Any, heads: int, kv_heads: int, d: int, where: str, padded: dict) -> tuple[list[int], list[int]]:
    """(query heads kept in kv-group order, kv heads kept) so that every kept group has as many query heads."""
    group = heads // kv_heads
    q_w, o_w = attn.q_proj.weight.detach(), attn.o_proj.weight.detach()
    v_w, v_b = attn.v_proj.weight.detach(), attn.v_proj.bias
    v_b = v_b.detach() if v_b is not None else None
    del q_w  # zero query rows do not make a head zero (see the module docstring)

    def zero_v(g: int) -> bool:
        return _is_zero(v_w[g * d : (g + 1) * d], None if v_b is None else v_b[g * d : (g + 1) * d])

    kept: dict[int, list[int]] = {}
    for g in range(kv_heads):
        members = [g * group + i for i in range(group)]
        alive = [h for h in members if not (_is_zero(o_w[:, h * d : (h + 1) * d]) or zero_v(g))]
        if alive:
            kept[g] = alive
    if not kept:  # keep one head: removing a whole attention block is depth pruning, not this
        kept = {0: [0]}
        padded[where] = "every head is zero; one is kept (removing the block is depth pruning)"
    width = max(len(v) for v in kept.values())
    for g, alive in kept.items():
        if len(alive) < width:
            spare = [g * group + i for i in range(group) if g * group + i not in alive]
            kept[g] = sorted(alive + spare[: width - len(alive)])
            padded[f"{where}.kv{g}"] = (
                f"kept {width - len(alive)} zero query head(s) so every kv group has {width} "
                "(transformers and GroupQueryAttention repeat each kv head equally)"
            )
    kv_keep = sorted(kept)
    return [h for g in kv_keep for h in kept[g]], kv_keep


def slice_causal_lm(module: Any, *, consume: bool = False) -> SliceResult:
    """Returns a copy of ``module`` with its zero heads and MLP neurons physically removed (exact).

    The copy's untouched tensors are ``module``'s own (shared, not copied): convert or modify neither in place.

    Args:
        module: a transformers Llama-style causal LM (or an HFModel holding one) whose pruning is in zeros
            (masks already applied).
        consume: empty each of ``module``'s decoder layers once its copy is made, so that its pages (read for
            the copy) are let go layer by layer; ``module`` is unusable afterwards (the caller drops it).

    Raises:
        UnsupportedModelError: the architecture is not Llama-style (see :func:`_decoder_layers`).
    """
    import torch

    module = getattr(module, "module", module)
    layers = _decoder_layers(module)
    text = text_config(module.config)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    d = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    act = str(getattr(text, "hidden_act", "")).lower()
    dense = LayerWidths(-1, heads, kv_heads, int(layers[0].mlp.down_proj.in_features))

    # The copy shares the largest tensors with ``module`` (the embedding and lm_head, which slicing never
    # cuts): a full deep copy would hold the model twice at its peak (9.8 GB for a 1B fp32 model). Neither
    # module is modified in place afterwards. The decoder layers are copied one at a time below, each after
    # its cut (so only what is kept is copied). When ``module`` is consumed, a layer's tensors are copied even
    # where nothing is cut from them: shared, a view into a memory-mapped checkpoint shard keeps the whole
    # shard mapped, with every page the masked model read resident, after the masked module is freed (3.8 GB
    # at 1B for 0.7 GB of attention projections), and held here they keep every layer's pages until the end
    # (13 GB at 8B). A module the caller keeps stays mapped anyway: sharing then saves the copy.
    in_layers = {id(t): t for layer in layers for t in _tensors(layer)}
    shared = {
        id(t): t
        for t in (*module.parameters(), *module.buffers())
        if (not consume or id(t) not in in_layers) and t.numel() * t.element_size() >= _SHARE_MIN_BYTES
    }
    memo = in_layers | shared
    sliced = copy.deepcopy(module, memo=memo)
    del memo, in_layers  # they hold every masked tensor: kept, no layer's pages could go before the end
    widths: list[LayerWidths] = []
    padded: dict[str, str] = {}
    with torch.no_grad():
        for i, (layer, original) in enumerate(zip(_decoder_layers(sliced), layers, strict=True)):
            borrowed = {id(t) for t in _tensors(original)} - shared.keys()
            q_heads, kv = _slice_attention(layer.self_attn, d, f"model.layers.{i}.self_attn", padded)
            intermediate = _slice_mlp(layer.mlp, act, f"model.layers.{i}.mlp", padded)
            widths.append(LayerWidths(i, q_heads, kv, intermediate))
            _own_tensors(layer, borrowed)
            if consume:
                _empty(original)

    result = SliceResult(sliced, d, dense, widths, padded)
    if result.uniform:
        first = widths[0]
        config = sliced.config
        for cfg in {id(config): config, id(text_config(config)): text_config(config)}.values():
            cfg.num_attention_heads = first.num_heads
            cfg.num_key_value_heads = first.kv_heads
            cfg.intermediate_size = first.intermediate
            cfg.head_dim = d  # no longer hidden_size // num_attention_heads
    log.info("sliced %s: %s", type(module).__name__, [(w.num_heads, w.kv_heads, w.intermediate) for w in widths])
    return result


def text_config(config: Any) -> Any:
    """The decoder's configuration (a multimodal config nests it; a plain one is it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _tensors(layer: Any) -> list[Any]:
    return [*layer.parameters(), *layer.buffers()]


def _own_tensors(layer: Any, borrowed: Any) -> None:
    """Copies every tensor of ``layer`` that is still one of the masked module's (ids in ``borrowed``)."""
    import torch

    for sub in layer.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and id(param) in borrowed:
                sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and id(buffer) in borrowed:
                sub._buffers[name] = buffer.clone()


def _empty(layer: Any) -> None:
    """Replaces every tensor of ``layer`` with an empty one of its dtype (its storage, often a view of a
    mapped checkpoint shard, is freed when nothing else holds it)."""
    import torch

    for sub in layer.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(param.new_empty(0), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = buffer.new_empty(0)


def _slice_attention(attn: Any, d: int, where: str, padded: dict[str, str]) -> tuple[int, int]:
    """Removes ``attn``'s zero query heads and the kv heads no kept query head reads; (query, kv) heads kept."""
    import torch

    n_heads = attn.q_proj.out_features // d
    n_kv = attn.k_proj.out_features // d
    q_keep, kv_keep = _head_plan(attn, n_heads, n_kv, d, where, padded)
    if len(q_keep) < n_heads or len(kv_keep) < n_kv:
        q_cols = torch.tensor([h * d + j for h in q_keep for j in range(d)])
        kv_cols = torch.tensor([g * d + j for g in kv_keep for j in range(d)])
        attn.q_proj = restricted_linear(attn.q_proj, rows=q_cols)
        attn.k_proj = restricted_linear(attn.k_proj, rows=kv_cols)
        attn.v_proj = restricted_linear(attn.v_proj, rows=kv_cols)
        attn.o_proj = restricted_linear(attn.o_proj, cols=q_cols)
    attn.num_key_value_groups = len(q_keep) // len(kv_keep)
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, len(q_keep))
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(kv_keep)
    return len(q_keep), len(kv_keep)


def dead_neurons(mlp: Any, act: str) -> Any:
    """A bool tensor: which of ``mlp``'s neurons add zero for every input (see the module docstring)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    dead = ~down.weight.detach().any(dim=0)
    for proj, needs_zero_act in ((gate, True), (up, False)):
        if needs_zero_act and act not in _ZERO_AT_ZERO:
            continue
        rows_zero = ~proj.weight.detach().any(dim=1)
        if proj.bias is not None:
            rows_zero &= proj.bias.detach() == 0
        dead |= rows_zero
    return dead


def mlp_adds_zero(mlp: Any, act: str) -> bool:
    """The MLP adds zero to the residual stream (every neuron was pruned; slicing kept one zero neuron)."""
    if mlp.down_proj.bias is not None and bool(mlp.down_proj.bias.detach().any()):
        return False
    return bool(dead_neurons(mlp, act).all())


def attention_adds_zero(attn: Any) -> bool:
    """The attention block adds zero to the residual stream (every head was pruned; slicing kept one zero head)."""
    if attn.o_proj.bias is not None and bool(attn.o_proj.bias.detach().any()):
        return False
    v_zero = not bool(attn.v_proj.weight.detach().any()) and (
        attn.v_proj.bias is None or not bool(attn.v_proj.bias.detach().any())
    )
    return v_zero or not bool(attn.o_proj.weight.detach().any())


def _slice_mlp(mlp: Any, act: str, where: str, padded: dict[str, str]) -> int:
    """Removes ``mlp``'s zero neurons (see the module docstring for when one is zero); the width kept."""
    import torch

    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    dead = dead_neurons(mlp, act)
    keep = torch.nonzero(~dead).flatten()
    if keep.numel() == 0:
        keep = torch.tensor([0])
        padded[where] = "every neuron is zero; one is kept"
    if keep.numel() < dead.numel():
        mlp.gate_proj = restricted_linear(gate, rows=keep)
        mlp.up_proj = restricted_linear(up, rows=keep)
        mlp.down_proj = restricted_linear(down, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())
    return int(keep.numel())
