"""Text-decoder configs of the public Gemma 2 / 3 / 4 checkpoints (spec section 7), in the form their config.json
files have on the Hub (Gemma 3 4B+ and every Gemma 4 are multimodal; Gemma 3 uses the legacy rope keys).

Used to plan memory before downloading anything, to benchmark on real shapes, and in tests.
"""

from __future__ import annotations

import copy

from .config import plan_from_config

_G2 = dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=256000, sliding_window=4096,
           attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
           rope_theta=10000.0, head_dim=256, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
           rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
_G3 = dict(model_type="gemma3_text", head_dim=256, query_pre_attn_scalar=256, rope_theta=1000000.0,
           rope_local_base_freq=10000.0, sliding_window_pattern=6, hidden_activation="gelu_pytorch_tanh",
           rms_norm_eps=1e-6, final_logit_softcapping=None, attn_logit_softcapping=None)
_G4 = dict(model_type="gemma4_text", vocab_size=262144, head_dim=256, global_head_dim=512,
           final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
           rope_parameters={
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                  "rope_theta": 1000000.0},
           })


def _mm(model_type: str, architecture: str, text: dict) -> dict:
    return {"model_type": model_type, "architectures": [architecture], "text_config": text,
            "tie_word_embeddings": True}


def _g4_types(num_layers: int, period: int) -> list[str]:
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers)]


PUBLIC_CONFIGS: dict[str, dict] = {
    "gemma-2-2b": dict(_G2, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                       intermediate_size=9216),
    "gemma-2-9b": dict(_G2, hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                       intermediate_size=14336),
    "gemma-2-27b": dict(_G2, hidden_size=4608, num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16,
                        intermediate_size=36864, head_dim=128, query_pre_attn_scalar=144),
    "gemma-3-1b": dict(_G3, architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=1152,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, intermediate_size=6912,
                       sliding_window=512, max_position_embeddings=32768, rope_scaling=None),
    "gemma-3-4b": _mm("gemma3", "Gemma3ForConditionalGeneration", dict(
        _G3, hidden_size=2560, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=10240, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "gemma-3-12b": _mm("gemma3", "Gemma3ForConditionalGeneration", dict(
        _G3, hidden_size=3840, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=15360, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "gemma-3-27b": _mm("gemma3", "Gemma3ForConditionalGeneration", dict(
        _G3, hidden_size=5376, num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
        intermediate_size=21504, sliding_window=1024, head_dim=128, query_pre_attn_scalar=168,
        rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "gemma-4-e2b": _mm("gemma4", "Gemma4ForConditionalGeneration", dict(
        _G4, hidden_size=1536, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
        intermediate_size=6144, use_double_wide_mlp=True, sliding_window=512, layer_types=_g4_types(35, 5),
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144, num_kv_shared_layers=20,
        attention_k_eq_v=False, max_position_embeddings=131072)),
    "gemma-4-e4b": _mm("gemma4", "Gemma4ForConditionalGeneration", dict(
        _G4, hidden_size=2560, num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=10240, sliding_window=512, layer_types=_g4_types(42, 6), hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262144, num_kv_shared_layers=18, attention_k_eq_v=False,
        max_position_embeddings=131072)),
    "gemma-4-26b-a4b": _mm("gemma4", "Gemma4ForConditionalGeneration", dict(
        _G4, hidden_size=2816, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, attention_k_eq_v=True, intermediate_size=2112, sliding_window=1024,
        layer_types=_g4_types(30, 6), hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        max_position_embeddings=262144)),
    "gemma-4-31b": _mm("gemma4", "Gemma4ForConditionalGeneration", dict(
        _G4, hidden_size=5376, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=16,
        num_global_key_value_heads=4, attention_k_eq_v=True, intermediate_size=21504, sliding_window=1024,
        layer_types=_g4_types(60, 6), hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        max_position_embeddings=262144)),
    # google/gemma-4-12B(-it): Gemma4UnifiedForConditionalGeneration; text_config as published (the PLE / MoE fields
    # are present and off; K=V global layers with one KV head of 512).
    "gemma-4-12b": _mm("gemma4_unified", "Gemma4UnifiedForConditionalGeneration", dict(
        _G4, model_type="gemma4_unified_text", hidden_size=3840, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=15360,
        sliding_window=1024, layer_types=_g4_types(48, 6), hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=262144, enable_moe_block=False, num_kv_shared_layers=0,
        use_double_wide_mlp=False, max_position_embeddings=262144, use_bidirectional_attention="vision")),
}


def public_config(name: str) -> dict:
    """A deep copy of a public checkpoint's config.json (text part as on the Hub)."""
    if name not in PUBLIC_CONFIGS:
        raise KeyError(f"unknown public checkpoint {name!r}; known: {', '.join(PUBLIC_CONFIGS)}")
    return copy.deepcopy(PUBLIC_CONFIGS[name])


def public_plan(name: str):
    return plan_from_config(public_config(name), source=name)
