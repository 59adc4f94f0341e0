"""Configuration of a ``nemotron-nas`` (DeciLM) checkpoint written by prune2deploy.

Each decoder layer has its own block config: attention (``no_op``: the layer has none; else every one of
``num_attention_heads`` query heads, ``n_heads_in_group`` of them per kv head) and FFN (``no_op``; else a SwiGLU
MLP whose width comes from ``ffn_mult``, see :func:`ffn_width`). vLLM and TensorRT-LLM read ``block_configs``
by attribute (``block.attention.no_op``) and TensorRT-LLM converts each block with ``dataclasses.asdict``, so
the blocks are dataclasses; :meth:`DeciLMConfig.to_dict` writes them back as the JSON objects they came from.

vLLM and TensorRT-LLM run this file with their own transformers (4.x or 5.x) when they load the folder with
``trust_remote_code``, so it keeps to what both major versions accept: a ``LlamaConfig`` subclass with its own
``__init__``, as remote configurations have. Written by prune2deploy; it imports nothing of prune2deploy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from transformers import LlamaConfig

__all__ = ["AttentionConfig", "BlockConfig", "DeciLMConfig", "FFNConfig", "ffn_width"]

#: DeciLM's FFN widths are multiples of this (vLLM's and TensorRT-LLM's readers round up to it).
FFN_MULTIPLE = 256


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width a DeciLM reader builds from ``ffn_mult``: ``int(2 * ffn_mult * hidden_size / 3)`` rounded up
    to a multiple of 256, as vLLM's and TensorRT-LLM's ``_ffn_mult_to_intermediate_size`` compute it."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


@dataclasses.dataclass
class AttentionConfig:
    """One layer's attention: absent (``no_op``) or ``num_attention_heads / n_heads_in_group`` kv heads."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None


@dataclasses.dataclass
class FFNConfig:
    """One layer's FFN: absent (``no_op``) or a SwiGLU MLP of ``ffn_width(ffn_mult, hidden_size)`` neurons."""

    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None


@dataclasses.dataclass
class BlockConfig:
    """One decoder layer's block config, read by attribute as vLLM and TensorRT-LLM read it."""

    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    ffn: FFNConfig = dataclasses.field(default_factory=FFNConfig)

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> BlockConfig:
        """A block from its JSON object; a key this configuration does not read must be unset (None/False)."""
        return cls(
            _part(AttentionConfig, block.get("attention") or {}, "attention"),
            _part(FFNConfig, block.get("ffn") or {}, "ffn"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _part(kind: type, values: Mapping[str, Any], where: str) -> Any:
    """``kind`` from ``values``; a set key it has no field for is an error (the model would silently differ)."""
    known = {f.name for f in dataclasses.fields(kind)}
    unread = sorted(key for key, value in values.items() if key not in known and value not in (None, False))
    if unread:
        raise ValueError(f"block_configs {where}: {', '.join(unread)} set, which this configuration does not read")
    return kind(**{key: value for key, value in values.items() if key in known})


class DeciLMConfig(LlamaConfig):
    """A Llama configuration whose per-layer widths come from ``block_configs``.

    ``num_key_value_heads`` and ``intermediate_size`` are per layer, so config.json has them null; in memory they
    hold what a reader falls back to (the first attention layer's kv heads, the widest FFN) and ``to_dict``
    writes null again.
    """

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[Any] | None = None, **kwargs: Any) -> None:
        blocks = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b) for b in block_configs or []]
        kv_heads = kwargs.pop("num_key_value_heads", None)
        intermediate = kwargs.pop("intermediate_size", None)
        super().__init__(**kwargs)
        if blocks and len(blocks) != self.num_hidden_layers:
            raise ValueError(f"{len(blocks)} block_configs for num_hidden_layers={self.num_hidden_layers}")
        self.block_configs = blocks
        heads = self.num_attention_heads
        groups = [b.attention.n_heads_in_group for b in blocks if not b.attention.no_op]
        widths = [ffn_width(b.ffn.ffn_mult, self.hidden_size) for b in blocks if not b.ffn.no_op and b.ffn.ffn_mult]
        self.num_key_value_heads = int(kv_heads or (heads // groups[0] if groups and groups[0] else heads))
        if intermediate is not None or widths:
            self.intermediate_size = int(intermediate or max(widths))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: blocks as objects, the per-layer globals null (``block_configs`` has them)."""
        output = super().to_dict()
        output["block_configs"] = [block.to_dict() for block in self.block_configs]
        output["num_key_value_heads"] = None
        output["intermediate_size"] = None
        return output
