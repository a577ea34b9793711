"""Shared fixtures for the Hugging Face parity tests.

Checkpoints are made by transformers itself (config class -> *ForCausalLM / *ForConditionalGeneration in float32,
perturbed per spec section 8.1, `save_pretrained`), then loaded by our runtime without transformers and compared
with HF's eager float32 forward. "Exact" is judged against HF's own float32-vs-float64 deviation (spec 8.1):
bound = max(1e-4, 4 * max|HF fp32 - HF fp64|) over the same teacher-forced sequence.

Measurements (max diffs, bounds, bf16 match rates, timings) are collected with `report(...)` and printed in the
pytest terminal summary ("HF parity measurements").
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# test/sim is the simulation tier: its own environment (scripts/sim_env.sh) and rootdir (test/sim/pytest.ini).
collect_ignore = ["sim"]

transformers = pytest.importorskip("transformers")

from nxdi_gemma.cpu import GemmaForCausalLM, KVCache, load_model  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# Spec 8.1 fixtures (verbatim).

GEMMA2_TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=8,
    attn_logit_softcapping=2.0, final_logit_softcapping=1.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
    pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
)  # fmt: skip

GEMMA3_TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    query_pre_attn_scalar=24, sliding_window=8,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    },
    final_logit_softcapping=None, attn_logit_softcapping=None,
    max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
    pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
)  # fmt: skip

GEMMA4_TINY_ALL = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    layer_types=["sliding_attention", "sliding_attention", "full_attention",
                 "sliding_attention", "sliding_attention", "full_attention"],
    sliding_window=8,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                           "rope_theta": 1000000.0},
    },
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
    num_kv_shared_layers=2, use_double_wide_mlp=True,
    enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
    final_logit_softcapping=1.0,
    max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.2,
    pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
)  # fmt: skip

GEMMA4_TINY_E = dict(
    GEMMA4_TINY_ALL, hidden_size=48, attention_k_eq_v=False, num_global_key_value_heads=None,
    enable_moe_block=False, num_experts=None, top_k_experts=None, moe_intermediate_size=None,
)  # fmt: skip

GEMMA4_TINY_MOE = dict(
    GEMMA4_TINY_ALL, hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
    num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
)  # fmt: skip

# Gemma 4 12B (gemma4_unified) in miniature: its geometry's ratios (global layers: 1 KV head, K=V, head dim twice
# the sliding layers'; sliding layers GQA 2:1), 5:1 cut to two periods of 3, final softcap, no PLE / MoE / KV sharing.
GEMMA4_UNIFIED_TINY = dict(
    {key: value for key, value in GEMMA4_TINY_ALL.items() if key not in (
        "hidden_size_per_layer_input", "vocab_size_per_layer_input",  # the 12B config refuses PLE keys ...
        "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size")},  # ... and MoE keys
    num_kv_shared_layers=0, use_double_wide_mlp=False,
)  # fmt: skip

# fixture name -> (HF model_type, config kwargs)
TINY_FIXTURES: dict[str, tuple[str, dict]] = {
    "gemma2": ("gemma2", GEMMA2_TINY),
    "gemma3": ("gemma3_text", GEMMA3_TINY),
    "gemma4_all": ("gemma4_text", GEMMA4_TINY_ALL),
    "gemma4_e": ("gemma4_text", GEMMA4_TINY_E),
    "gemma4_moe": ("gemma4_text", GEMMA4_TINY_MOE),
    "gemma4_unified": ("gemma4_unified_text", GEMMA4_UNIFIED_TINY),  # text-only save (model.*)
    "gemma4_unified_mm": ("gemma4_unified", GEMMA4_UNIFIED_TINY),  # multimodal (model.language_model.*)
}

# Tiny vision towers for the multimodal wrappers (never run: text-only inputs).
GEMMA3_TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
GEMMA4_TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
    head_dim=16, position_embedding_size=64,
)  # fmt: skip

# Gemma 4 12B's embedders (raw patches / waveform frames projected to the text width; never run on text inputs).
GEMMA4_UNIFIED_TINY_VISION = dict(patch_size=2, pooling_kernel_size=2, mm_posemb_size=16)
GEMMA4_UNIFIED_TINY_AUDIO = dict(audio_embed_dim=16)

FLOOR = 1e-4  # absolute floor of every logit bound (spec 8.1)

# --------------------------------------------------------------------------------------------------------------
# HF classes and model construction.

GENERATION = {
    "gemma2": 2, "gemma3_text": 3, "gemma3": 3, "gemma4_text": 4, "gemma4": 4, "gemma4_unified_text": 4,
    "gemma4_unified": 4,
}  # fmt: skip
MULTIMODAL = {"gemma3", "gemma4", "gemma4_unified"}


def hf_classes(model_type: str):
    """(config class, model class) of a Gemma model_type; multimodal types give the ForConditionalGeneration."""
    t = transformers
    return {
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM),
        "gemma3_text": (t.Gemma3TextConfig, t.Gemma3ForCausalLM),
        "gemma3": (t.Gemma3Config, t.Gemma3ForConditionalGeneration),
        "gemma4_text": (t.Gemma4TextConfig, t.Gemma4ForCausalLM),
        "gemma4": (t.Gemma4Config, t.Gemma4ForConditionalGeneration),
        "gemma4_unified_text": (t.Gemma4UnifiedTextConfig, t.Gemma4UnifiedForCausalLM),
        "gemma4_unified": (t.Gemma4UnifiedConfig, t.Gemma4UnifiedForConditionalGeneration),
    }[model_type]


def hf_config(model_type: str, text: dict, vision: dict | None = None, **top):
    """HF config object; for multimodal types `text` becomes text_config (vision defaults to the tiny tower)."""
    config_cls, _ = hf_classes(model_type)
    if model_type not in MULTIMODAL:
        return config_cls(**text)
    if model_type == "gemma4_unified":
        width = text["hidden_size"]
        vision = dict(GEMMA4_UNIFIED_TINY_VISION, mm_embed_dim=width, output_proj_dims=width, **(vision or {}))
        top.setdefault("audio_config", dict(GEMMA4_UNIFIED_TINY_AUDIO))
    if vision is None:
        vision = GEMMA3_TINY_VISION if model_type == "gemma3" else GEMMA4_TINY_VISION
    if model_type == "gemma3":
        top.setdefault("mm_tokens_per_image", 4)
    return config_cls(text_config=dict(text), vision_config=dict(vision), **top)


def text_prefix(model_type: str) -> str:
    """In-memory prefix of the text decoder's parameters."""
    return "model.language_model." if model_type in MULTIMODAL else "model."


NORM = re.compile(r"norm(_\d)?\.weight$")


def perturb_(model: torch.nn.Module, model_type: str, seed: int = 0) -> torch.nn.Module:
    """Spec 8.1 recipe on the text decoder, in place and seeded: Gemma 2/3 norms 0.3*N(0,1); Gemma 4 norms,
    router.scale and router.per_expert_scale 1 + 0.3*N(0,1); layer_scalar U(0.5, 1.5); embed_tokens *= 0.2."""
    gen = torch.Generator().manual_seed(seed)
    identity = 1.0 if GENERATION[model_type] == 4 else 0.0
    prefix = text_prefix(model_type)
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in sorted(named):
            t = named[name]
            if not name.startswith(prefix):
                continue
            if NORM.search(name):
                t.copy_(identity + 0.3 * torch.randn(t.shape, generator=gen))
            elif name.endswith(("router.scale", "router.per_expert_scale")):
                t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=gen))
            elif name.endswith("layer_scalar"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
        named[prefix + "embed_tokens.weight"].mul_(0.2)  # tied with lm_head
    return model


def build_hf_model(model_type: str, text: dict, seed: int = 0, vision: dict | None = None, **top):
    """A float32, eager-attention HF model made from a config dict with HF's own random init, then perturbed."""
    _, model_cls = hf_classes(model_type)
    config = hf_config(model_type, text, vision, **top)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return perturb_(model.eval(), model_type, seed)


def save_hf(model, path: Path, **kwargs) -> Path:
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def load_hf(path: Path, model_type: str, dtype: torch.dtype = torch.float32):
    """HF model from a checkpoint directory, eager attention (and eager experts in float64: grouped_mm has no
    float64 kernel)."""
    _, model_cls = hf_classes(model_type)
    kwargs = {"attn_implementation": "eager", "dtype": dtype}
    if dtype == torch.float64:
        kwargs["experts_implementation"] = "eager"
    return model_cls.from_pretrained(path, **kwargs).eval()


def make_prompt(length: int, vocab: int, seed: int) -> list[int]:
    """Token ids >= 3 (no pad/eos/bos)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


# --------------------------------------------------------------------------------------------------------------
# Running HF and ours.


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits [B, S, V] of one forward over ids [B, S] (teacher forcing)."""
    if ids.dim() == 1:
        ids = ids[None]
    out = model(input_ids=ids, attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids))
    return out.logits.float()


@torch.no_grad()
def hf_greedy(model, ids: torch.Tensor, new_tokens: int, attention_mask: torch.Tensor | None = None):
    """HF greedy generate: (new tokens [B, n], per-step raw logits [B, n, V] float32).

    min_new_tokens = max_new_tokens so HF never stops early, and eos_token_id=None so that HF does not suppress EOS
    either (with an EOS id, min_new_tokens masks it and HF's choice is no longer the argmax our greedy takes)."""
    if ids.dim() == 1:
        ids = ids[None]
    out = model.generate(
        input_ids=ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        top_k=None,
        top_p=None,
    )
    tokens = out.sequences[:, ids.shape[1] :]
    logits = torch.stack(out.logits, dim=1).float()
    return tokens, logits


@torch.no_grad()
def ours_teacher_forced(model: GemmaForCausalLM, seq: list[int], prompt_len: int) -> torch.Tensor:
    """Our float32 logits [len(seq), V]: prefill of the prompt (all positions), then one decode step per further
    token of `seq` through the KV cache, as generation runs it."""
    ids = torch.tensor([seq])
    cache = KVCache.allocate(model.plan, 1, len(seq), model.dtype)
    pads = torch.zeros(1, dtype=torch.long)
    out = [model.forward_step(ids[:, :prompt_len], cache, pads, last_only=False)[0]]
    for t in range(prompt_len, len(seq)):
        out.append(model.forward_step(ids[:, t : t + 1], cache, pads, last_only=True)[0])
    return torch.cat(out).float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def principled_bound(fp32_logits: torch.Tensor, fp64_logits: torch.Tensor) -> tuple[float, float]:
    """(bound, HF fp32-vs-fp64 deviation): bound = max(1e-4, 4 * max|HF fp32 - HF fp64|)."""
    dev = (fp32_logits.double() - fp64_logits.double()).abs().max().item()
    return max(FLOOR, 4.0 * dev), dev


@torch.no_grad()
def hf_fp64_logits(path: Path, model_type: str, seq: list[int]) -> torch.Tensor:
    """HF's float64 logits [len(seq), V] of the checkpoint at `path` (the reference for the principled bound)."""
    model = load_hf(path, model_type, torch.float64)
    ids = torch.tensor([seq])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
    del model
    gc.collect()
    return logits


# --------------------------------------------------------------------------------------------------------------
# Session-scoped tiny checkpoints.


@dataclass
class TinyCase:
    name: str
    model_type: str
    config: dict
    path: Path
    hf: object  # float32 eager HF model (the one that was saved)
    ours: GemmaForCausalLM  # float32, loaded from `path` without transformers

    @property
    def vocab(self) -> int:
        return self.config["vocab_size"]


class TinyCases:
    """Builds each spec fixture once per session: HF model (seeded, perturbed), saved, loaded by us."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def __call__(self, name: str) -> TinyCase:
        if name not in self.cache:
            model_type, config = TINY_FIXTURES[name]
            hf = build_hf_model(model_type, config, seed=0)
            path = save_hf(hf, self.root / name)
            self.cache[name] = TinyCase(name, model_type, config, path, hf, load_model(path, progress=False))
        return self.cache[name]


@pytest.fixture(scope="session")
def tiny_case(tmp_path_factory) -> TinyCases:
    return TinyCases(tmp_path_factory.mktemp("tiny_hf"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bigmem: a real-geometry case needing ~10-14 GB RAM (fp32 checkpoint + float64 HF reference)"
    )


# --------------------------------------------------------------------------------------------------------------
# Measurement report, printed at the end of the run.

REPORT: list[tuple[str, str]] = []


def report(key: str, text: str) -> None:
    REPORT.append((key, text))


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    terminalreporter.section("HF parity measurements")
    width = max(len(k) for k, _ in REPORT)
    for key, text in REPORT:
        terminalreporter.write_line(f"{key:<{width}}  {text}")
