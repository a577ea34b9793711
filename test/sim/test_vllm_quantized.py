"""Quantized weights and KV cache served through the real vLLM 0.13.0 + vllm-neuron 0.4.1 (test_vllm.py's harness),
switched on with `additional_config={"override_neuron_config": {...}}` as a vLLM user does: the Gemma 4 checkpoint
with every feature (MoE, PLE, KV sharing, K=V) with int8 weights per channel (quantized_checkpoints_path does not
exist: vllm-neuron's `save_quantized_state_dict` call writes it from the safetensors) and an fp8 KV cache. HF's
reference: transformers on the int8-rounded copy of the checkpoint with a cache that rounds what it stores to fp8
(make_goldens.py). Greedy tokens equal on all six prompts, under continuous batching."""

from __future__ import annotations

import json

import pytest
from test_vllm import NEW_TOKENS, PROMPT_LENGTHS, RELEASE, _checkpoints, _drive, pytestmark  # noqa: F401


@pytest.fixture(scope="module")
def case(sim) -> dict:
    sim.need(RELEASE)
    spec = {"config": _checkpoints()["gemma4moe"], "seed": 0, "prompt_lengths": PROMPT_LENGTHS, "prompt_seed": 2026,
            "new_tokens": NEW_TOKENS, "weights": "int8_rounded", "kv_cache": "f8e4m3"}
    case_dir = sim.goldens({"vllm_gemma4moe_int8_kvfp8": spec})["vllm_gemma4moe_int8_kvfp8"]
    golden = json.loads((case_dir / "golden.json").read_text())
    from nxdi_gemma.tiny import byte_tokenizer_json

    tokenizer = case_dir / "ckpt" / "tokenizer.json"
    if not tokenizer.exists():
        tokenizer.write_text(byte_tokenizer_json())
    return {"ckpt": case_dir / "ckpt", "prompts": golden["prompts"], "tokens": golden["tokens"],
            "transformers": golden["transformers"],
            "max_tokens": [NEW_TOKENS if i % 2 == 0 else NEW_TOKENS - 5 * i // 2 for i in range(len(PROMPT_LENGTHS))]}


def test_int8_weights_fp8_kv_cache_through_vllm(sim, tmp_path, case):
    qdir = tmp_path / "quantized"
    override = {"quantized": True, "quantized_checkpoints_path": str(qdir),
                "quantization_type": "per_channel_symmetric", "quantization_dtype": "int8", "kv_cache_quant": True}
    report = _drive(sim, tmp_path, case, "gemma4moe_int8_kvfp8", override_neuron_config=override)
    assert (qdir / "model.safetensors").is_file()  # written on first use
    assert report["neuron_config"]["quantized"] is True and report["neuron_config"]["kv_cache_quant"] is True


@pytest.mark.slow  # one more vLLM start (about 2 min); the head's exactness is test_quantized.py's (NxDI CPU mode)
def test_quantized_lm_head_through_vllm(sim, tmp_path):
    """`quantize_lm_head: true` reaches our neuron config through vllm-neuron's override_neuron_config (its
    `_get_neuron_config_after_override` merges every key, identical in 0.4.1 and 0.5.0) and the quantized head runs
    under vLLM's sampling: Gemma 2 (final softcap after the dequantized matmul), greedy tokens equal HF on the copy
    whose weights and LM head are int8-rounded (make_goldens int8_rounded_head)."""
    sim.need(RELEASE)
    spec = {"config": _checkpoints()["gemma2"], "seed": 0, "prompt_lengths": PROMPT_LENGTHS, "prompt_seed": 2026,
            "new_tokens": NEW_TOKENS, "weights": "int8_rounded_head"}
    case_dir = sim.goldens({"vllm_gemma2_int8head": spec})["vllm_gemma2_int8head"]
    golden = json.loads((case_dir / "golden.json").read_text())
    from nxdi_gemma.tiny import byte_tokenizer_json

    tokenizer = case_dir / "ckpt" / "tokenizer.json"
    if not tokenizer.exists():
        tokenizer.write_text(byte_tokenizer_json())
    case = {"ckpt": case_dir / "ckpt", "prompts": golden["prompts"], "tokens": golden["tokens"],
            "transformers": golden["transformers"], "max_tokens": [NEW_TOKENS] * len(PROMPT_LENGTHS)}
    qdir = tmp_path / "quantized"
    override = {"quantized": True, "quantized_checkpoints_path": str(qdir), "quantization_dtype": "int8",
                "quantization_type": "per_channel_symmetric", "quantize_lm_head": True}
    report = _drive(sim, tmp_path, case, "gemma2_int8head", override_neuron_config=override)
    assert report["neuron_config"]["quantize_lm_head"] is True
    from safetensors import safe_open

    with safe_open(str(qdir / "model.safetensors"), "pt") as f:  # written on first use, with the head
        assert str(f.get_tensor("lm_head.weight").dtype) == "torch.int8"
