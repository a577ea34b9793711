"""Checkpoints and Hugging Face goldens for test_vllm.py, made by the reference Python (transformers >= 5 and the
project installed: NXDI_GEMMA_REFERENCE_PYTHON), since the tier's transformers 4.57 has no Gemma 4 and misreads
Gemma 3 configs saved by transformers 5.

    python vllm_fixtures.py OUT_DIR

Writes OUT_DIR/<name>/ (config.json, model.safetensors, tokenizer.json; no tokenizer_config.json, so transformers
has to resolve the tokenizer class from the config class) and OUT_DIR/<name>.golden.json ({"prompts", "tokens",
"transformers"}: HF's pure-argmax greedy tokens, float32, eager attention, NEW_TOKENS per prompt), for every name in
CHECKPOINTS. Prompts are seeded random ids of PROMPT_LENS tokens; the tiny models' sliding window is 8, so prompts
and generations cross it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

from nxdi_gemma.checkpoint import save_checkpoint
from nxdi_gemma.reference import hf_greedy
from nxdi_gemma.tiny import TINY_CONFIGS, byte_tokenizer_json, random_weights

PROMPT_LENS = (3, 9, 17, 26, 33, 40)
NEW_TOKENS = 16


def _text(kind: str, **changes: object) -> dict:
    return {**{k: v for k, v in TINY_CONFIGS[kind].items() if k != "architectures"}, **changes}


def _hub_style_gemma3(config: dict) -> dict:
    """The transformers-4 RoPE fields that Gemma 3 checkpoints on the Hub carry, for the same RoPE as `config`'s
    transformers-5 `rope_parameters` (full layers: theta 1e6, linear x8; sliding layers: theta 1e4)."""
    rope = config["rope_parameters"]
    full, sliding = rope["full_attention"], rope["sliding_attention"]
    assert sliding["rope_type"] == "default" and full["rope_type"] == "linear", rope
    hub = {k: v for k, v in config.items() if k != "rope_parameters"}
    hub.update(rope_theta=full["rope_theta"], rope_local_base_freq=sliding["rope_theta"],
               rope_scaling={"rope_type": "linear", "factor": full["factor"]})
    return hub


# name -> config.json. Weights: nxdi_gemma.tiny.random_weights (seed 0), named as each class stores them on disk.
CHECKPOINTS: dict[str, dict] = {
    "gemma2": TINY_CONFIGS["gemma2"],
    "gemma3": TINY_CONFIGS["gemma3"],  # rope_parameters keyed by layer type, as transformers 5 saves it
    "gemma3hub": _hub_style_gemma3(TINY_CONFIGS["gemma3"]),
    # `nxdi-gemma make-tiny --kind gemma4`: text-only Gemma4ForCausalLM with MoE, PLE, KV sharing, K=V
    "gemma4moe": TINY_CONFIGS["gemma4"],
    # dense Gemma 4 in the multimodal layout the Hub's Gemma 4 checkpoints use (weights under model.language_model.)
    "gemma4mm": {
        "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "initializer_range": 0.2,
        "tie_word_embeddings": True,
        "text_config": _text("gemma4", model_type="gemma4_text", enable_moe_block=False, num_experts=None,
                             top_k_experts=None, moe_intermediate_size=None),
    },
    # multimodal Gemma 3 (text served; weights under language_model.model.), transformers-5 RoPE in text_config
    "gemma3mm": {
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "initializer_range": 0.2,
        "tie_word_embeddings": True, "text_config": _text("gemma3"),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        "mm_tokens_per_image": 4, "boi_token_index": 261, "eoi_token_index": 262, "image_token_index": 263,
    },
}


def prompts_for(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(2026)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENS]


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, config in CHECKPOINTS.items():
        golden = out / f"{name}.golden.json"
        if golden.exists():
            continue
        ckpt = out / name
        save_checkpoint(ckpt, config, random_weights(config), {"tokenizer.json": byte_tokenizer_json()})
        prompts = prompts_for(config.get("text_config", config)["vocab_size"])
        refs = hf_greedy(ckpt, prompts, NEW_TOKENS, torch.float32)
        golden.write_text(json.dumps({"prompts": prompts, "tokens": [ref.tokens for ref in refs],
                                      "transformers": transformers.__version__}))
        print(f"{name}: HF greedy tokens, distinct per prompt {[len(set(ref.tokens)) for ref in refs]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
