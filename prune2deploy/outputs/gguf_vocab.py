"""The tokenizer of a GGUF file, from the loaded transformers tokenizer (a helper of :mod:`.gguf`).

llama.cpp tokenizes by itself, so a GGUF file carries the vocabulary: token strings, their types, the BPE
merges, the special ids and the chat template. Byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3,
Qwen2) are written as llama.cpp's ``gpt2`` model with the pre-tokenizer its regex matches; the
pre-tokenizer is read from the tokenizer's own ``tokenizer.json``, never guessed from a model name. A
model without a tokenizer (a module built in code), or one whose tokenizer is not byte-level BPE, gets a
placeholder vocabulary (``<tok_N>``) that llama.cpp loads and evaluates token ids with; the report says so.
A tokenizer that transformers read from a GGUF file (the bundled SmolLM2) is copied from that file's own
``tokenizer.*`` fields: transformers' conversion keeps the vocabulary but not llama.cpp's pre-tokenizer name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GGUFVocab", "vocab_of"]

log = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type / gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    """What the GGUF writer puts under ``tokenizer.*``."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (the placeholder, SentencePiece-shaped)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad → id
    add_bos: bool | None = None
    chat_template: str | None = None
    note: str = ""  # what the report says about it

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for key, token in self.special.items():
            adders[key](token)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pre": self.pre,
            "tokens": len(self.tokens),
            "merges": len(self.merges),
            "special": dict(self.special),
            "chat_template": bool(self.chat_template),
            **({"note": self.note} if self.note else {}),
        }


def vocab_of(tokenizer: Any, vocab_size: int, config: Any) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer`` padded to the model's ``vocab_size`` (the embedding's rows);
    the placeholder when there is no tokenizer or it is not byte-level BPE (``note`` says why)."""
    if tokenizer is None:
        return _placeholder(vocab_size, config, "no tokenizer with the model: placeholder tokens <tok_N> (ids only)")
    source = _source_gguf(tokenizer)
    if source is not None:
        copied = _from_gguf(source, vocab_size)
        if copied is not None:
            return copied
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _placeholder(
            vocab_size, config, f"{type(tokenizer).__name__} is not a fast tokenizer: placeholder tokens (ids only)"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _byte_level(spec.get("pre_tokenizer")):
        return _placeholder(
            vocab_size,
            config,
            f"the tokenizer is {model.get('type')} without a byte-level pre-tokenizer; only byte-level BPE "
            "(GPT-2 style) is carried: placeholder tokens (ids only); convert hf/ with llama.cpp's "
            "convert_hf_to_gguf.py for its vocabulary",
        )
    return _byte_level_bpe(tokenizer, spec, vocab_size)


def _source_gguf(tokenizer: Any) -> Path | None:
    """The GGUF file a tokenizer was read from (a folder of one .gguf and no tokenizer.json), else None."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir() or (folder / "tokenizer.json").exists():
        return None
    files = sorted(folder.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


@dataclass
class _CopiedVocab(GGUFVocab):
    """The input GGUF's own ``tokenizer.*`` fields, copied as they are (its pre-tokenizer name included, which
    transformers' GGUF conversion does not keep)."""

    fields: list[tuple[str, Any, Any, Any]] = field(default_factory=list)  # key, value, type, element type

    def write(self, writer: Any) -> None:
        for key, value, vtype, sub_type in self.fields:
            writer.add_key_value(key, value, vtype, sub_type)


def _from_gguf(path: Path, vocab_size: int) -> GGUFVocab | None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = []
    for key, entry in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = entry.types[0]
        sub_type = entry.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(entry.types) > 1 else None
        fields.append((key, entry.contents(), vtype, sub_type))
    values = {key: value for key, value, _, _ in fields}
    tokens = values.get("tokenizer.ggml.tokens") or []
    if len(tokens) != vocab_size:
        return None
    special = {
        key: int(values[f"tokenizer.ggml.{name}_token_id"])
        for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        if f"tokenizer.ggml.{name}_token_id" in values
    }
    vocab = _CopiedVocab(
        str(values.get("tokenizer.ggml.model")), values.get("tokenizer.ggml.pre"), list(tokens),
        list(values.get("tokenizer.ggml.token_type") or []), list(values.get("tokenizer.ggml.merges") or []),
        None, special, values.get("tokenizer.ggml.add_bos_token"), values.get("tokenizer.chat_template"),
        f"copied from the input GGUF {path.name}", fields,
    )  # fmt: skip
    return vocab


def _byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_byte_level(p) for p in pre.get("pretokenizers") or [])


def _pre_name(pre: Any) -> tuple[str, str]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE's ``pre_tokenizer`` JSON, and a note when unsure."""
    parts = pre.get("pretokenizers") or [pre]
    kinds = [p.get("type") for p in parts]
    regexes = [str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split"]
    digits = [p for p in parts if p.get("type") == "Digits" and p.get("individual_digits")]
    if kinds == ["Digits", "ByteLevel"] and digits:
        return "smollm", ""
    if regexes and r"\p{N}{1,3}" in regexes[0] and r"\p{L}+" in regexes[0]:
        return "llama-bpe", ""
    if regexes and r"\p{N}|" in regexes[0].replace(r"\p{N}{1,3}", "") and r"\p{L}+" in regexes[0]:
        return "qwen2", ""
    if kinds == ["ByteLevel"]:
        return "gpt-2", ""
    return "default", f"pre-tokenizer {kinds} not recognised: llama.cpp's default splitting is used"


def _byte_level_bpe(tokenizer: Any, spec: dict[str, Any], vocab_size: int) -> GGUFVocab:
    model = spec["model"]
    by_id: dict[int, str] = {int(i): tok for tok, i in model["vocab"].items()}
    types = {i: _NORMAL for i in by_id}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = _CONTROL if added.get("special") else _USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        return _placeholder(
            vocab_size,
            None,
            f"the tokenizer has ids up to {max(by_id)} but the model {vocab_size} embedding rows: placeholder tokens",
        )
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # embedding rows the tokenizer never produces (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            token_types.append(_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre, note = _pre_name(spec.get("pre_tokenizer") or {})
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        token = getattr(tokenizer, f"{key}_token_id", None)
        if token is not None:
            special[key] = int(token)
    template = getattr(tokenizer, "chat_template", None)
    add_bos = getattr(tokenizer, "add_bos_token", None)
    return GGUFVocab(
        "gpt2", pre, tokens, token_types, merges, None, special,
        bool(add_bos) if add_bos is not None else None, template if isinstance(template, str) else None, note,
    )  # fmt: skip


def _placeholder(vocab_size: int, config: Any, note: str) -> GGUFVocab:
    """A SentencePiece-shaped vocabulary of ``<tok_N>`` strings: llama.cpp loads it and evaluates ids."""
    special = {}
    for key in ("bos", "eos", "pad"):
        token = getattr(config, f"{key}_token_id", None) if config is not None else None
        if isinstance(token, list):
            token = token[0] if token else None
        if token is not None and 0 <= int(token) < vocab_size:
            special[key] = int(token)
    tokens = [f"<tok_{i}>" for i in range(vocab_size)]
    types = [_NORMAL] * vocab_size
    for key, token in special.items():
        types[token] = _CONTROL
        tokens[token] = f"<{key}>"
    unk = next((i for i in range(vocab_size) if i not in special.values()), 0)
    types[unk] = _UNKNOWN
    tokens[unk] = "<unk>"
    special["unk"] = unk
    log.info("gguf vocabulary: %s", note)
    return GGUFVocab("llama", "default", tokens, types, [], [0.0] * vocab_size, special, None, None, note)
