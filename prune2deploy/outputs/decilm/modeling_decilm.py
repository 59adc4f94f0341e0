"""A transformers model for ``nemotron-nas`` (DeciLM) checkpoints written by prune2deploy.

Each decoder layer is a Llama layer built with its own widths from its block config: ``num_attention_heads``
query heads and ``num_attention_heads / n_heads_in_group`` kv heads, a SwiGLU FFN of ``ffn_width(ffn_mult)``
neurons, and no attention (or no FFN) where the block says ``no_op`` — the layer then only passes the residual
stream on. The blocks are transformers' own Llama modules (``LlamaAttention``, ``LlamaMLP``, ``LlamaRMSNorm``,
``LlamaRotaryEmbedding``), so a layer computes what a Llama layer of its widths computes.

vLLM and TensorRT-LLM do not run this file (they build the model with their own DeciLM code); transformers runs it
for ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. Written for transformers 5; the
names of the cache argument and output field (``cache`` or ``past_key_values``, renamed within 5.x) are read
from the installed version. Written by prune2deploy; it imports nothing of prune2deploy.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_decilm import DeciLMConfig, ffn_width

__all__ = ["DeciLMDecoderLayer", "DeciLMForCausalLM", "DeciLMModel", "DeciLMPreTrainedModel"]


def _cache_name(function: Any) -> str:
    """The name ``function`` takes the KV cache by (transformers 5 renamed ``past_key_values`` to ``cache``)."""
    parameters = inspect.signature(function).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), "past_key_values")


_ATTENTION_CACHE = _cache_name(LlamaAttention.forward)
_MASK_CACHE = _cache_name(create_causal_mask)
_OUTPUT_CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MAJOR = int(transformers.__version__.split(".")[0])

#: Flags transformers' own models take through decorators (``can_return_tuple``); here outputs are always objects.
_OUTPUT_FLAGS = ("return_dict", "output_attentions", "output_hidden_states")


class _LayerConfig:
    """The model's configuration as one layer sees it: its own kv heads or FFN width, everything else read from
    the model's (so that a later change of the attention implementation reaches every layer)."""

    def __init__(self, config: DeciLMConfig, **own: Any) -> None:
        self.__dict__["_config"] = config
        self.__dict__.update(own)

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("_config")
        if config is None:  # during copy/unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(config, name)


class DeciLMDecoderLayer(nn.Module):
    """A Llama decoder layer with this layer's widths; attention or FFN absent where its block is ``no_op``."""

    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        super().__init__()
        block = config.block_configs[layer_idx]
        where = f"block_configs[{layer_idx}]"
        if block.attention.replace_with_linear or block.ffn.replace_with_linear:
            raise ValueError(
                f"{where}: replace_with_linear is true; prune2deploy never writes it and this modeling code does not "
                "build a linear replacement (vLLM's reader ignores it too): set it to false, or load the folder with "
                "the modeling code of the model that uses it"
            )
        self.input_layernorm = self.self_attn = None
        self.post_attention_layernorm = self.mlp = None
        if not block.attention.no_op:
            heads, group = config.num_attention_heads, block.attention.n_heads_in_group
            if not group or heads % group:
                raise ValueError(f"{where}: n_heads_in_group={group} does not divide {heads} query heads")
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = LlamaAttention(_LayerConfig(config, num_key_value_heads=heads // group), layer_idx)
        if not block.ffn.no_op:
            if block.ffn.ffn_mult is None:
                raise ValueError(f"{where}: an FFN without ffn_mult")
            width = ffn_width(block.ffn.ffn_mult, config.hidden_size)
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = LlamaMLP(_LayerConfig(config, intermediate_size=width))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            attended, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                **{_ATTENTION_CACHE: cache},
                **kwargs,
            )
            hidden_states = hidden_states + attended
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading as transformers does it for Llama."""

    config_class = DeciLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeciLMDecoderLayer"]  # noqa: RUF012 (transformers' class attribute)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class DeciLMModel(DeciLMPreTrainedModel):
    """Embedding, the decoder layers (each with its own widths) and the final norm."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        if config.block_configs and config.block_configs[0].attention.no_op:
            # the KV cache's length and the causal mask are read from layer 0 (vLLM's layer 0 also needs it)
            raise ValueError("block_configs[0]: layer 0 must have attention for this modeling code")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        for flag in _OUTPUT_FLAGS:
            kwargs.pop(flag, None)
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=mask,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_OUTPUT_CACHE: cache})


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    """The causal LM: :class:`DeciLMModel` and its LM head (tied to the embedding when the config says so)."""

    # transformers 5 names the tied pair, 4 lists the tied parameter
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        for flag in _OUTPUT_FLAGS:
            kwargs.pop(flag, None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUTPUT_CACHE: getattr(outputs, _OUTPUT_CACHE)})
