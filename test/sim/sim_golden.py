"""Reading the tier's HF goldens (made by make_goldens.py) and comparing a run with them. Plain torch, no pytest:
imported by test/sim/conftest.py and by the drivers that run inside NxDI processes (their folder is test/sim)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Golden:
    name: str
    ckpt: Path  # checkpoint directory (config.json + model.safetensors)
    path: Path  # golden.json
    prompts: list[list[int]]
    tokens: list[list[int]]  # HF's greedy tokens per prompt
    logits: list[torch.Tensor]  # float32 [new_tokens, vocab] per prompt, along HF's greedy path
    bound: float | None  # max |logit diff| allowed in float32 (spec 8.1); None for a bfloat16 golden
    hf_fp32_vs_fp64: float | None
    model_type: str
    sliding_window: int | None
    new_tokens: int
    dtype: str  # what HF ran in: "float32" or "bfloat16"


def load_golden(case_dir: str | Path) -> Golden:
    case_dir = Path(case_dir)
    doc = json.loads((case_dir / "golden.json").read_text())
    return Golden(
        name=doc["name"], ckpt=case_dir / "ckpt", path=case_dir / "golden.json", prompts=doc["prompts"],
        tokens=doc["tokens"], logits=[torch.tensor(x, dtype=torch.float32) for x in doc["logits"]],
        bound=doc["bound"], hf_fp32_vs_fp64=doc["hf_fp32_vs_fp64"], model_type=doc["model_type"],
        sliding_window=doc["sliding_window"], new_tokens=doc["new_tokens"], dtype=doc.get("dtype", "float32"),
    )  # fmt: skip


def compare(golden: Golden, prompt: int, tokens: list[int], logits: torch.Tensor) -> dict:
    """Token match rate, first divergent step, and max |logit diff| over the whole vocabulary at every step where
    both runs had seen the same tokens (up to and including the first divergence)."""
    ref = golden.tokens[prompt]
    if len(tokens) != len(ref) or logits.shape != golden.logits[prompt].shape:
        raise ValueError(f"{golden.name} prompt {prompt}: got {len(tokens)} tokens / logits {tuple(logits.shape)}, "
                         f"golden has {len(ref)} / {tuple(golden.logits[prompt].shape)}")
    same = [a == b for a, b in zip(tokens, ref, strict=True)]
    first = same.index(False) if False in same else None
    steps = len(ref) if first is None else first + 1
    diff = (logits[:steps].float() - golden.logits[prompt][:steps]).abs().max().item()
    return {"match": sum(same) / len(ref), "first_divergence": first, "max_abs_logit_diff": diff}
