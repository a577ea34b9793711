"""CPU throughput of our runtime against Hugging Face transformers on the same checkpoint and prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def shrunk_config(config: dict, num_layers: int, vocab_size: int) -> dict:
    """A public config cut to its first `num_layers` layers and a smaller vocab (same per-layer geometry).
    KV sharing is dropped (its producers would be cut away)."""
    from .config import plan_from_config

    plan = plan_from_config(config)
    out = dict(config)
    text = dict(out["text_config"]) if "text_config" in out else out
    text.update(num_hidden_layers=num_layers, vocab_size=vocab_size,
                layer_types=list(plan.layer_types[:num_layers]))
    text.pop("sliding_window_pattern", None)
    if plan.generation == 4:
        text.update(num_kv_shared_layers=0, vocab_size_per_layer_input=vocab_size)
    if "text_config" in out:
        out["text_config"] = text
    return out


@dataclass
class Throughput:
    ours_tokens_per_s: float
    hf_tokens_per_s: float
    new_tokens: int

    @property
    def ratio(self) -> float:
        return self.ours_tokens_per_s / self.hf_tokens_per_s


@torch.inference_mode()
def cpu_vs_hf(model_dir: str, prompt_ids: list[list[int]], max_new_tokens: int, dtype: torch.dtype) -> Throughput:
    """Greedy generation of every prompt (batch 1, exactly max_new_tokens) by both, one timed run each after a
    short warm-up; tokens/s counts generated tokens over wall time including prefill."""
    from .cpu import generate, load_model
    from .reference import import_transformers, load_hf_model

    transformers = import_transformers()
    ours = load_model(model_dir, dtype, progress=False)
    hf = load_hf_model(model_dir, dtype)

    def run_ours(n: int) -> None:
        for ids in prompt_ids:
            generate(ours, [ids], n, stop_on_eos=False)

    def run_hf(n: int) -> None:
        config = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                               eos_token_id=None, pad_token_id=0)
        for ids in prompt_ids:
            x = torch.tensor([ids])
            hf.generate(x, attention_mask=torch.ones_like(x), generation_config=config)

    timings = {}
    for name, fn in (("ours", run_ours), ("hf", run_hf)):
        fn(2)  # warm-up: first-call allocations and lazy imports are not what we measure
        start = time.perf_counter()
        fn(max_new_tokens)
        timings[name] = time.perf_counter() - start
    total = max_new_tokens * len(prompt_ids)
    return Throughput(total / timings["ours"], total / timings["hf"], total)
