"""Weight-only quantization of genai/'s decoder: MatMulNBits weights, one 2-D weight at a time.

Each projection weight ``[K, N]`` is quantized by ONNX Runtime's own MLAS kernel — the binding that
``onnxruntime.quantization.matmul_nbits_quantizer.DefaultWeightOnlyQuantizer.qbits_block_quant`` calls, with
the same layout (packed ``[N, K/block, block·bits/8]`` uint8, scales ``[N, K/block]``) and the same zero
padding of K to the block, so any pruned width quantizes. The binding is called directly rather than through
that module because importing it runs ``logging.basicConfig(level=INFO)`` on the root logger (onnxruntime
1.32), which would turn on every library's INFO messages in the CLI. Quantization is symmetric (no zero
points: MatMulNBits then assumes 2^(bits-1)), the scheme of onnxruntime-genai's model builder.

Nothing here ever holds more than one weight: the decoder builder asks for a weight's packed bytes and scales
while ``ir.save`` streams the file (:class:`OneWeightAtATime`).

Quantized decoders are approximate: every weight is checked as it is quantized (ONNX Runtime's MatMulNBits
must give it back within one quantization step: :func:`dequantization_error`), :func:`approximate_error`
measures the decoder against the masked model (relative logit error, KL, top-1 agreement) and :data:`BOUNDS`
are what a correct quantization of a well-behaved model stays within on the check inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BOUNDS",
    "FLOAT_PRECISIONS",
    "GENAI_PRECISIONS",
    "GenaiPrecision",
    "OneWeightAtATime",
    "WeightQuant",
    "approximate_error",
    "dequantization_error",
    "lm_head_quant",
    "quantize_weight",
    "weight_quant",
]

#: ``--genai-precision`` values: fp32 (CPU, exact), fp16 (CUDA), int8/int4 (MatMulNBits, CPU).
GENAI_PRECISIONS = ("fp32", "fp16", "int8", "int4")
FLOAT_PRECISIONS = {"fp32": np.float32, "fp16": np.float16}

#: What a correct quantization stays within on genai/'s check (11 positions of random ids on the masked model,
#: :func:`prune2deploy.outputs.genai.reference_outputs`): mean KL in nats per position, and the mean absolute
#: logit error relative to the mean absolute logit. Both, because a model with near-flat logits (random
#: weights) keeps KL tiny even when a weight is garbage, while the relative error then jumps to ~1 (a
#: corrupted scale on the tiny test Llama: 1.24, KL 0.03); top-1 agreement is reported, not bounded (on flat
#: logits a correct int4 decoder agrees on half the positions). Keyed by the coarsest weights in the decoder.
#: Measured on dense SmolLM2-135M: int8 KL 0.0035, relative 0.0096; int4 (lm_head fp32) KL 0.59, relative 0.14
#: (a 135M model loses much to int4; onnxruntime-genai's builder int4 too). Beyond them, with every weight
#: checked while written (:class:`OneWeightAtATime`), the report warns instead of failing: the model is
#: sensitive to quantization (SmolLM2 with half its MLP and a third of its heads masked, no recovery
#: training: KL 0.6 from an int8 lm_head alone).
BOUNDS: dict[str, dict[str, float]] = {
    "fp16": {"kl_mean": 0.01, "mean_rel_diff": 0.02},
    "int8": {"kl_mean": 0.05, "mean_rel_diff": 0.1},
    "int4": {"kl_mean": 1.0, "mean_rel_diff": 0.5},
}


@dataclass(frozen=True)
class WeightQuant:
    """How one MatMul weight is stored: MatMulNBits with ``bits`` per weight and one fp32 scale per block.

    Attributes:
        bits: 4 or 8.
        block_size: weights per scale along K (a power of two, at least 16: MatMulNBits' constraint).
        accuracy_level: MatMulNBits' minimum compute type of the activations (4: int8 on CPU, the builder's
            default for CPU; 0: unset).
    """

    bits: int
    block_size: int = 32
    accuracy_level: int = 4

    def blocks(self, k: int) -> int:
        return -(-k // self.block_size)

    def nbytes(self, k: int, n: int, scale_bytes: int = 4) -> int:
        """Bytes of a ``[K, N]`` weight: packed blocks (K padded to the block) and one scale per block."""
        blocks = self.blocks(k)
        return n * blocks * (self.block_size * self.bits // 8 + scale_bytes)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales included (K a multiple of the block)."""
        return self.bits + 32 / self.block_size

    def attributes(self, k: int, n: int) -> dict[str, int]:
        attrs = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size}
        if self.accuracy_level:  # 0 is left out, as onnxruntime's quantizer does (not every provider reads it)
            attrs["accuracy_level"] = self.accuracy_level
        return attrs


def weight_quant(precision: str, *, block_size: int = 32, accuracy_level: int = 4) -> WeightQuant | None:
    """The projections' quantization for a ``--genai-precision`` (None: float weights)."""
    if precision in FLOAT_PRECISIONS:
        return None
    bits = {"int8": 8, "int4": 4}[precision]
    return WeightQuant(bits, block_size, accuracy_level)


def lm_head_quant(
    precision: str, lm_head: str | None, *, block_size: int = 32, accuracy_level: int = 4
) -> WeightQuant | None:
    """The LM head's quantization: ``lm_head`` as asked (``int8``, ``int4``, ``float``), else the body's: what
    onnxruntime-genai's builder does unless told ``matmul_mixed_precision=last_matmul:int8``, so that a default
    int4 folder is the builder's int4 folder of the same weights (``int8`` keeps more of the model's quality
    for some speed: docs/genai.md)."""
    if lm_head is None:
        lm_head = precision if precision in ("int8", "int4") else "float"
    if lm_head == "float":
        return None
    return WeightQuant({"int8": 8, "int4": 4}[lm_head], block_size, accuracy_level)


def quantize_weight(weight: np.ndarray, quant: WeightQuant) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` float weight → (packed uint8 ``[N, K/block, block·bits/8]``, scales float32 ``[N, K/block]``).

    ONNX Runtime's MLAS block quantizer, symmetric, K zero-padded to the block (exactly what
    ``DefaultWeightOnlyQuantizer.qbits_block_quant`` does for QOperator MatMulNBits).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if weight.ndim != 2:
        raise ValueError(f"MatMulNBits weights are 2-D [K, N], not {weight.shape}")
    k, n = weight.shape
    block, bits = quant.block_size, quant.bits
    blocks = quant.blocks(k)
    weight = np.asarray(weight, dtype=np.float32)
    if blocks * block != k:
        weight = np.pad(weight, ((0, blocks * block - k), (0, 0)))
    weight = np.ascontiguousarray(weight)
    packed = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), dtype=np.uint8)  # not written: symmetric
    kernel = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    kernel(packed, weight, scales, zero_points, block, n, k, True)
    return packed, scales


class OneWeightAtATime:
    """The last weight quantized, so that its packed bytes and its scales (two initializers, written one after
    the other) come from one quantization, and no other quantized weight is held.

    Each weight is checked as it is quantized (:func:`dequantization_error`): ONNX Runtime's MatMulNBits on
    those bytes must give the weight back within one quantization step — the quantizer's own guarantee, whatever
    the model — so a wrong layout, scale or attribute fails here even on a model whose logits a correct
    quantization moves a lot. ``report()`` is what the check found over all weights.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._value: tuple[np.ndarray, np.ndarray] | None = None
        self._checked: dict[str, float] = {}

    def get(self, key: str, make: Callable[[], np.ndarray], quant: WeightQuant) -> tuple[np.ndarray, np.ndarray]:
        if self._key != key or self._value is None:
            self._value = None  # the previous weight goes before the next one is made
            weight = make()
            self._value = quantize_weight(weight, quant)
            if key not in self._checked:
                self._checked[key] = dequantization_error(weight, *self._value, quant)
            del weight
            self._key = key
        return self._value

    def report(self) -> dict[str, Any]:
        """Weights checked, the worst error in quantization steps, and whether every weight is within one."""
        worst = max(self._checked.values(), default=0.0)
        bad = sorted(k for k, v in self._checked.items() if not v <= 1 + 1e-4)
        return {"weights_checked": len(self._checked), "max_error_steps": worst, "passed": not bad, "failed": bad[:5]}


def dequantization_error(
    weight: np.ndarray, packed: np.ndarray, scales: np.ndarray, quant: WeightQuant, rows: int = 16
) -> float:
    """The largest error of ONNX Runtime's MatMulNBits on ``packed``/``scales`` against ``weight`` ([K, N]), in
    quantization steps (|scale| of each block), over ``rows`` rows of K spread from the first to the last (the
    identity's rows through the kernel give the dequantized weight's rows; accuracy level 0: exact products)."""
    import onnx_ir as ir

    from prune2deploy.ort_session import make_session

    k, n = weight.shape
    picked = np.unique(np.linspace(0, k - 1, min(rows, k)).astype(np.int64))
    x = ir.Value(name="x", shape=ir.Shape([len(picked), k]), type=ir.TensorType(ir.DataType.FLOAT))
    b = ir.Value(name="b", shape=ir.Shape(packed.shape), type=ir.TensorType(ir.DataType.UINT8),
                 const_value=ir.tensor(packed, name="b"))  # fmt: skip
    s = ir.Value(name="s", shape=ir.Shape(scales.shape), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(np.asarray(scales, np.float32), name="s"))  # fmt: skip
    attrs = {key: v for key, v in quant.attributes(k, n).items() if key != "accuracy_level"}
    node = ir.node("MatMulNBits", [x, b, s], attributes=attrs, domain="com.microsoft", name="check")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[b, s], opset_imports={"": 18, "com.microsoft": 1})
    data = ir.serde.serialize_model(ir.Model(graph, ir_version=10)).SerializeToString()
    eye = np.zeros((len(picked), k), dtype=np.float32)
    eye[np.arange(len(picked)), picked] = 1
    got = make_session(data, prepack=False, optimize=False).run(None, {"x": eye})[0]
    step = np.abs(scales[:, picked // quant.block_size].T).astype(np.float32)  # [rows, N]
    error = np.abs(got - weight[picked].astype(np.float32))
    return float(np.max(np.where(step > 0, error / np.where(step > 0, step, 1), np.where(error > 0, np.inf, 0))))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def approximate_error(want: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """A quantized decoder's logits against the masked model's: relative error (max and mean, of the logits'
    scale), KL(masked ‖ quantized) in nats per position (mean, max) and top-1 agreement."""
    want, got = want.astype(np.float32), got.astype(np.float32)
    diff = np.abs(want - got)
    scale = float(np.abs(want).max()) or 1.0
    p, q = _log_softmax(want), _log_softmax(got)
    kl = np.maximum((np.exp(p) * (p - q)).sum(-1), 0.0)
    finite = bool(np.isfinite(got).all())
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max()) / scale,
        "mean_rel_diff": float(diff.mean()) / (float(np.abs(want).mean()) or 1.0),
        "kl_mean": float(kl.mean()) if finite else float("inf"),
        "kl_max": float(kl.max()) if finite else float("inf"),
        "top1_agreement": float((want.argmax(-1) == got.argmax(-1)).mean()),
        "finite": finite,
    }


@dataclass(frozen=True)
class GenaiPrecision:
    """genai/'s decoder precision: the float type of its activations, KV cache and float weights, and the
    quantization of its projections and of its LM head (the compile options ``genai_*``).

    Attributes:
        name: ``fp32`` (CPU; the exact decoder), ``fp16`` (CUDA: every float tensor fp16, CUDA provider
            options), ``int8`` / ``int4`` (CPU: fp32 activations, MatMulNBits projections).
        block_size, accuracy_level: MatMulNBits' (onnxruntime-genai's builder defaults: 32, and 4 on CPU).
        lm_head: ``int8``, ``int4`` or ``float``; None: the body's precision when it is quantized, else float.
    """

    name: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4
    lm_head: str | None = None

    @classmethod
    def from_options(cls, options: Any) -> GenaiPrecision:
        return cls(
            getattr(options, "genai_precision", "fp32"),
            getattr(options, "genai_block_size", 32),
            getattr(options, "genai_accuracy_level", 4),
            getattr(options, "genai_lm_head", None),
        )

    @property
    def dtype(self) -> type[np.floating]:
        """Activations, KV cache, norms, embedding and float weights (fp32 for the quantized CPU decoders)."""
        return FLOAT_PRECISIONS.get(self.name, np.float32)

    @property
    def body(self) -> WeightQuant | None:
        return weight_quant(self.name, block_size=self.block_size, accuracy_level=self.accuracy_level)

    @property
    def head(self) -> WeightQuant | None:
        return lm_head_quant(self.name, self.lm_head, block_size=self.block_size, accuracy_level=self.accuracy_level)

    @property
    def exact(self) -> bool:
        """Whether the decoder computes the masked model up to fp32 rounding (else its check is approximate)."""
        return self.name == "fp32" and self.head is None

    @property
    def coarsest(self) -> str:
        """The key of :data:`BOUNDS` for this decoder: its coarsest weights."""
        bits = [q.bits for q in (self.body, self.head) if q is not None]
        return f"int{min(bits)}" if bits else self.name

    @property
    def provider(self) -> str:
        """The onnxruntime-genai execution provider the folder is written for."""
        return "cuda" if self.name == "fp16" else "cpu"

    def describe(self) -> dict[str, Any]:
        body, head = self.body, self.head
        out: dict[str, Any] = {"precision": self.name, "provider": self.provider}
        if body is not None or head is not None:
            out.update(block_size=self.block_size, accuracy_level=self.accuracy_level, symmetric=True)
        out["projections"] = f"int{body.bits}" if body else self.name
        out["lm_head"] = f"int{head.bits}" if head else self.name
        return out
