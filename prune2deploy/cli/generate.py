"""``prune2deploy generate``: text from a compiled causal LM's genai/ folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prune2deploy.cli.flags import HelpFormatter
from prune2deploy.io import dumps_json

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Generate text from a compiled causal LM (OUT/genai): onnxruntime-genai when installed, else a greedy loop "
    "on ONNX Runtime."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate", help="generate text from a compiled causal LM (OUT/genai)", description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    g.add_argument("out", type=Path, help="compile output folder (or its genai/ folder)")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (≥ 1)")
    g.add_argument("--engine", default="auto", choices=["auto", "genai", "onnxruntime"],
                   help="auto: onnxruntime-genai when installed, else onnxruntime")  # fmt: skip
    g.add_argument("--sample", action="store_true", help="sample instead of greedy (onnxruntime-genai)")
    g.add_argument("--temperature", type=float, help="sampling temperature, above 0 (with --sample; default 1)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens (with --sample; default 50)")
    g.add_argument(
        "--top-p", type=float, help="sample from the tokens that make up this probability, in (0, 1] (with --sample; "
        "default 1)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, help="sampling seed (with --sample)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    g.add_argument("--threads", type=int, help="ONNX Runtime threads, ≥ 1 (onnxruntime engine)")
    g.add_argument("--json", action="store_true", help="print the text, tokens and speed as JSON")
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prune2deploy import api

    result = api.generate(
        args.out, args.prompt, max_new_tokens=args.max_new_tokens, engine=args.engine, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
        threads=args.threads,
    )  # fmt: skip
    if args.json:
        print(dumps_json(result.to_dict(), indent=2))
        return 0
    print(result.text)
    print(
        f"· {len(result.new_tokens)} new tokens ({result.prompt_tokens} prompt) at {result.tokens_per_s:.1f} tok/s "
        f"on {result.engine}, {result.precision} decoder",
        file=sys.stderr,
    )
    return 0
