"""Token match: our greedy continuations against Hugging Face's (live, or from a golden file), per prompt."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import InputError
from .reference import Continuation

DEFAULT_PROMPTS = [
    "def fibonacci(n):",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot =",
    "SELECT name, COUNT(*) AS orders\nFROM customers\nJOIN orders ON",
    "for f in *.txt; do\n    echo",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "#include <stdio.h>\n\nint main(void) {\n    printf(",
]

# (prompt ids, max_new_tokens) -> one greedy Continuation per prompt, exactly max_new_tokens long
GreedyFn = Callable[[list[list[int]], int], list[Continuation]]


@dataclass
class PromptResult:
    prompt: str | list[int]
    match_rate: float
    first_divergence: int | None
    max_abs_logit_diff: float
    tokens: list[int]
    reference_tokens: list[int]


def compare(prompt: str | list[int], ours: Continuation, ref: Continuation) -> PromptResult:
    """Match rate over all positions; logits compared up to and including the first divergent step (the
    steps where both sides saw the same tokens)."""
    n = len(ref.tokens)
    if len(ours.tokens) != n:
        raise InputError(f"our backend produced {len(ours.tokens)} tokens, the reference {n}; both must produce {n}")
    same = [a == b for a, b in zip(ours.tokens, ref.tokens, strict=True)]
    first = same.index(False) if False in same else None
    steps = n if first is None else first + 1
    our_logits = ours.logits[:steps].float()
    if ref.logit_ids is not None:  # golden: only the reference's top-k logits are stored
        our_logits = torch.gather(our_logits, 1, ref.logit_ids[:steps])
    diff = (our_logits - ref.logits[:steps].float()).abs().max().item() if steps else 0.0
    return PromptResult(prompt, sum(same) / n, first, diff, ours.tokens, ref.tokens)


@dataclass
class Report:
    model: str
    backend: str
    dtype: str
    max_new_tokens: int
    reference: str
    prompts: list[PromptResult]

    @property
    def mean_match_rate(self) -> float:
        return sum(p.match_rate for p in self.prompts) / len(self.prompts)

    def to_json(self) -> dict:
        return {
            "model": self.model, "backend": self.backend, "dtype": self.dtype, "reference": self.reference,
            "max_new_tokens": self.max_new_tokens, "mean_match_rate": self.mean_match_rate,
            "prompts": [asdict(p) for p in self.prompts],
        }

    def table(self) -> str:
        lines = [
            f"model: {self.model}",
            f"backend: {self.backend}   dtype: {self.dtype}   new tokens: {self.max_new_tokens}   "
            f"reference: {self.reference}",
            f"{'#':>2}  {'prompt':<34} {'match':>7} {'first div':>9} {'max|dlogit|':>11}",
        ]
        for i, p in enumerate(self.prompts):
            text = p.prompt if isinstance(p.prompt, str) else f"<{len(p.prompt)} token ids>"
            text = text.replace("\n", "\\n")
            text = text if len(text) <= 34 else text[:31] + "..."
            div = "-" if p.first_divergence is None else str(p.first_divergence)
            lines.append(f"{i:>2}  {text:<34} {p.match_rate:>7.1%} {div:>9} {p.max_abs_logit_diff:>11.2e}")
        lines.append(f"mean match rate: {self.mean_match_rate:.1%}")
        return "\n".join(lines)


def run(prompts: list, prompt_ids: list[list[int]], ours: GreedyFn, refs: list[Continuation], **meta) -> Report:
    max_new = len(refs[0].tokens)
    results = [compare(p, o, r) for p, o, r in zip(prompts, ours(prompt_ids, max_new), refs, strict=True)]
    return Report(prompts=results, max_new_tokens=max_new, **meta)


def read_prompts(path: str | Path) -> list:
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"--prompts {path}: cannot read a JSON list of prompts ({err})") from None
    if not isinstance(prompts, list) or not prompts:
        raise InputError(f"--prompts {path}: expected a non-empty JSON list of strings or token-id lists")
    return prompts
