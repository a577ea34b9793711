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


@dataclass
class LatencyReport:
    backend: str
    model: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    ttft_s: list[float]  # one per run: time to the first token (the prefill)
    token_latency_s: list[float]  # every decode step of every run

    def summary(self) -> dict:
        steps = sorted(self.token_latency_s)

        def pct(p: float) -> float:
            return steps[min(len(steps) - 1, int(round(p / 100 * (len(steps) - 1))))]

        total = sum(self.ttft_s) + sum(self.token_latency_s)
        generated = self.batch_size * self.new_tokens * len(self.ttft_s)
        return {
            "backend": self.backend, "model": self.model, "batch_size": self.batch_size,
            "prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "runs": len(self.ttft_s),
            "ttft_ms_mean": 1e3 * sum(self.ttft_s) / len(self.ttft_s),
            "token_latency_ms": {"p50": 1e3 * pct(50), "p90": 1e3 * pct(90), "p99": 1e3 * pct(99)},
            "throughput_tokens_per_s": generated / total,
        }


def measure(prefill, decode, runs: int, new_tokens: int) -> tuple[list[float], list[float]]:
    """Time `prefill()` (returns the first token) and `decode(token, step)` (returns the next) over several runs,
    after one untimed warm-up run."""
    ttft, steps = [], []
    for run in range(runs + 1):
        start = time.perf_counter()
        token = prefill()
        first = time.perf_counter() - start
        latencies = []
        for step in range(new_tokens - 1):
            start = time.perf_counter()
            token = decode(token, step)
            latencies.append(time.perf_counter() - start)
        if run:  # run 0 is the warm-up
            ttft.append(first)
            steps.extend(latencies)
    return ttft, steps


@torch.inference_mode()
def cpu_latency(model_dir: str, batch: int, prompt_len: int, new_tokens: int, runs: int,
                dtype: torch.dtype) -> LatencyReport:
    from .cpu import KVCache, load_model

    model = load_model(model_dir, dtype, progress=False)
    plan = model.plan
    ids = torch.randint(3, plan.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    pads = torch.zeros(batch, dtype=torch.long)
    state = {}

    def prefill():
        state["cache"] = KVCache.allocate(plan, batch, prompt_len + new_tokens, model.dtype)
        return model.forward_step(ids, state["cache"], pads, last_only=True)[:, -1].argmax(-1)

    def decode(token, step):
        return model.forward_step(token[:, None], state["cache"], pads, last_only=True)[:, -1].argmax(-1)

    ttft, steps = measure(prefill, decode, runs, new_tokens)
    return LatencyReport("cpu", model_dir, batch, prompt_len, new_tokens, ttft, steps)


@torch.inference_mode()
def cpu_speculative(model_dir: str, draft_dir: str, batch: int, prompt_len: int, new_tokens: int, runs: int, k: int,
                    dtype: torch.dtype) -> dict:
    """Greedy decoding of the same random prompts without and with the draft (after one untimed warm-up each):
    wall-clock tokens/s including prefill, the draft's acceptance rate and target calls per generated token."""
    from . import speculation
    from .cpu import generate, load_model

    target = load_model(model_dir, dtype, progress=False)
    draft = speculation.load_draft(draft_dir, target, dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, target.plan.vocab_size, (batch, prompt_len), generator=gen).tolist()
    timings, spec = {}, None
    for name in ("plain", "speculative"):
        for run in range(runs + 1):
            start = time.perf_counter()
            if name == "plain":
                generate(target, prompts, new_tokens, stop_on_eos=False)
            else:
                spec = speculation.generate(target, draft, prompts, new_tokens, k, stop_on_eos=False)
            if run:  # run 0 is the warm-up
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    generated = batch * new_tokens * runs
    return {
        "backend": "cpu", "model": model_dir, "draft": draft_dir, "batch_size": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens, "runs": runs, "num_speculative_tokens": k,
        "acceptance_rate": spec.acceptance_rate, "target_calls_per_token": spec.target_calls_per_token(),
        "plain_tokens_per_s": generated / timings["plain"],
        "speculative_tokens_per_s": generated / timings["speculative"],
    }


@torch.inference_mode()
def neuron_latency(model_dir: str, compiled_dir: str, prompt_len: int, new_tokens: int, runs: int) -> LatencyReport:
    from .neuron.runtime import load_compiled

    model = load_compiled(model_dir, compiled_dir)
    batch = model.neuron_config.batch_size
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))

    def prefill():
        model.reset()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                    position_ids=torch.arange(prompt_len)[None].repeat(batch, 1), seq_ids=torch.arange(batch))
        return _next_tokens(out)

    def decode(token, step):
        position = prompt_len + step
        out = model(input_ids=token.view(batch, 1), attention_mask=torch.ones(batch, position, dtype=torch.long),
                    position_ids=torch.full((batch, 1), position), seq_ids=torch.arange(batch))
        return _next_tokens(out)

    ttft, steps = measure(prefill, decode, runs, new_tokens)
    return LatencyReport("neuron", model_dir, batch, prompt_len, new_tokens, ttft, steps)


def _next_tokens(out) -> torch.Tensor:
    if getattr(out, "logits", None) is not None:
        return out.logits[:, -1].argmax(-1)
    return out.tokens.view(-1)  # on-device sampling returns tokens


def write_chart(report: LatencyReport, path: str) -> None:
    """A PNG of the decode-step latencies with the p50/p90/p99 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report.summary()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([1e3 * t for t in report.token_latency_s], linewidth=0.8, label="decode step")
    for color, (name, value) in zip(("C1", "C2", "C3"), summary["token_latency_ms"].items(), strict=True):
        ax.axhline(value, color=color, linestyle="--", linewidth=0.8, label=f"{name} {value:.2f} ms")
    ax.set_xlabel("decode step (all runs)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report.backend}: batch {report.batch_size}, prompt {report.prompt_len}, "
                 f"TTFT {summary['ttft_ms_mean']:.1f} ms, {summary['throughput_tokens_per_s']:.1f} tok/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
