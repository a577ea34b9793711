"""Small random-weight Gemma checkpoints, created deterministically (the embedded default and test fixtures).

The configs are the spec's section 8.1 fixtures: sliding window 8 (prompts cross it), small softcaps so tanh is
non-linear, query_pre_attn_scalar != head_dim. Weights follow its recipe so that bugs show: norms perturbed away
from their identity value, layer scalars and router scales perturbed, and the embedding table scaled by 0.2 so
greedy decoding does not collapse into repeating one token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import plan_from_config

_COMMON = dict(
    vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
    max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.2,
    pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)
# Gemma 4's attention geometry, shared by the E/MoE-style tiny model and the 12B-like one: global layers with one KV
# head of twice the head dim and K=V, sliding layers GQA 2:1, a 5:1-style schedule cut to two periods of 3.
_GEMMA4_ATTENTION = dict(
    num_hidden_layers=6, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    layer_types=["sliding_attention", "sliding_attention", "full_attention",
                 "sliding_attention", "sliding_attention", "full_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    intermediate_size=96, final_logit_softcapping=1.0,
)
TINY_CONFIGS: dict[str, dict] = {
    "gemma2": dict(
        _COMMON, model_type="gemma2", architectures=["Gemma2ForCausalLM"], query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "gemma3": dict(
        _COMMON, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        final_logit_softcapping=None, attn_logit_softcapping=None,
    ),
    "gemma4": dict(
        _COMMON, **_GEMMA4_ATTENTION, model_type="gemma4_text", architectures=["Gemma4ForCausalLM"],
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=264, num_kv_shared_layers=2,
        use_double_wide_mlp=True, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
    ),
    # Gemma 4 12B-like (gemma4_unified_text, Gemma4UnifiedForCausalLM): the same attention; no PLE, MoE or KV sharing.
    "gemma4_unified": dict(
        _COMMON, **_GEMMA4_ATTENTION, model_type="gemma4_unified_text", architectures=["Gemma4UnifiedForCausalLM"],
        num_kv_shared_layers=0, use_double_wide_mlp=False,
    ),
}
TOKENIZER_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def byte_tokenizer_json() -> str:
    """A byte-level tokenizer (4 specials + 256 bytes, BOS prepended) that fits every tiny vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TOKENIZER_SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(TOKENIZER_SPECIALS)
    return tok.to_str()


# Where each checkpoint class stores its text decoder on disk (spec 4.5, 5.10).
DISK_PREFIX = {"gemma3": "language_model.model.", "gemma4": "model.language_model.",
               "gemma4_unified": "model.language_model."}


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for every tensor of the checkpoint, named as HF stores them on disk for the
    config's class (`model.` for *ForCausalLM; the multimodal classes' text prefixes)."""
    from .checkpoint import expected_shapes

    plan = plan_from_config(config)
    shapes = expected_shapes(plan)
    gen = torch.Generator().manual_seed(seed)
    std = config.get("initializer_range", 0.02)
    identity = 0.0 if plan.norm_adds_one else 1.0
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=gen)
        if name.endswith("norm.weight") or name.endswith(("router.scale", "per_expert_scale")):
            value = identity + 0.3 * noise if "router" not in name else 1.0 + 0.3 * noise
        elif name.endswith("layer_scalar"):
            value = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            value = std * noise * 0.2
        else:
            value = std * noise
        out[name] = value.float()
    prefix = DISK_PREFIX.get(config["model_type"])
    if prefix:
        out = {(prefix + n.removeprefix("model.")) if n.startswith("model.") else n: t for n, t in out.items()}
    return out


def write_tiny_checkpoint(out_dir: str | Path, kind: str = "gemma3", seed: int = 0) -> Path:
    """Create a random tiny checkpoint (config.json, model.safetensors, tokenizer.json) in a new directory."""
    if kind not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {sorted(TINY_CONFIGS)}")
    config = TINY_CONFIGS[kind]
    return save_checkpoint(
        out_dir, config, random_weights(config, seed), {"tokenizer.json": byte_tokenizer_json()}
    )


def random_hf_assistant(target_text_config: dict, seed: int, **text_overrides):
    """A miniature random Gemma 4 assistant drafter for a target with this text config, built by transformers
    (`Gemma4AssistantForCausalLM`, float32, eager): 2 layers (sliding window 6 + full), hidden 32, ordered embeddings
    with 8 centroids, HF's own init then perturbed as `random_weights` does (norms, layer scalars) plus a random
    token ordering. `text_overrides`: more assistant text-config fields (e.g. its number of query heads)."""
    from .reference import import_transformers

    transformers = import_transformers()
    text = dict(target_text_config, hidden_size=32, intermediate_size=64, num_hidden_layers=2, sliding_window=6,
                layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0, num_kv_shared_layers=2, use_double_wide_mlp=False,
                enable_moe_block=False, num_experts=None, top_k_experts=None, moe_intermediate_size=None,
                **text_overrides)
    text.pop("architectures", None)
    text.pop("model_type", None)
    config = transformers.Gemma4AssistantConfig(
        text_config=transformers.Gemma4TextConfig(**text), backbone_hidden_size=target_text_config["hidden_size"],
        use_ordered_embeddings=True, num_centroids=8, centroid_intermediate_top_k=3)
    torch.manual_seed(seed)
    model = transformers.Gemma4AssistantForCausalLM._from_config(config, attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight"):
                t.copy_(1.0 + 0.3 * torch.randn(t.shape, generator=gen))
            elif name.endswith("layer_scalar"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
        model.masked_embedding.token_ordering.copy_(torch.randperm(text["vocab_size"], generator=gen))
    return model
