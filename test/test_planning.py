"""`plan`: KV arithmetic checked against hand computations, refusals, and the CLI."""

import json

import pytest

from nxdi_gemma.cli import main
from nxdi_gemma.errors import InputError
from nxdi_gemma.planning import (
    INSTANCES,
    kv_cache_bytes,
    largest_fit,
    memory_plan,
    prefill_activation_bytes,
    prefill_chunk,
)
from nxdi_gemma.public_models import public_plan


def test_kv_cache_gemma3_27b_by_hand():
    # 62 layers: full where (i+1) % 6 == 0 -> 10 full, 52 sliding (window 1024); 16 KV heads / TP 8 = 2 per core;
    # head_dim 128; bf16; batch 1; 8192 tokens. Per layer: 2 (K and V) x batch x length x heads x dim x 2 bytes.
    # Prompts run in chunks of C = 2048 (the largest power of two with float32 scores 4 x 1 x 32/8 heads x C x
    # (8192 + C) <= 512 MiB), so full layers hold C spare slots after the 8192 (neuron/kv_cache.py).
    assert prefill_chunk(public_plan("gemma-3-27b"), 8, 1, 8192, 8192) == 2048
    sliding = 2 * 1 * 1024 * 2 * 128 * 2
    full = 2 * 1 * (8192 + 2048) * 2 * 128 * 2
    assert 52 * sliding + 10 * full == 159_383_552
    assert kv_cache_bytes(public_plan("gemma-3-27b"), tp=8, batch=1, seq_len=8192, dtype_bytes=2) == 159_383_552


def test_memory_plan_prefill_batch_sets_the_spare_slots_by_hand():
    # Under vLLM, vllm-neuron prefills one sequence per call (ctx_batch_size 1) while decoding 8: the prompt chunk,
    # hence the full layers' spare slots, follow the prefill batch. Gemma 3 27B, TP 8 (4 query heads per core),
    # 32768 tokens: float32 scores 4 x b x 4 x C x (32768 + C) <= 512 MiB gives C = 512 at b = 1, 128 at b = 8.
    plan = public_plan("gemma-3-27b")
    sliding = 2 * 8 * 1024 * 2 * 128 * 2  # 52 layers: batch 8, window 1024, 2 KV heads per core, head_dim 128, bf16
    full = {chunk: 2 * 8 * (32768 + chunk) * 2 * 128 * 2 for chunk in (512, 128)}  # 10 layers
    one_row = memory_plan(plan, "trn1.32xlarge", 8, 8, 32768, prefill_batch=1)
    assert one_row.kv_cache_per_core == 52 * sliding + 10 * full[512]
    assert memory_plan(plan, "trn1.32xlarge", 8, 8, 32768).kv_cache_per_core == 52 * sliding + 10 * full[128]
    assert one_row.activations_per_core < memory_plan(plan, "trn1.32xlarge", 8, 8, 32768).activations_per_core


def test_kv_cache_gemma4_e2b_by_hand():
    # 35 layers, the last 20 share KV (no cache); producers 0-14 hold full layers 4, 9, 14 and 12 sliding ones.
    # 1 KV head (replicated at TP 2); sliding head_dim 256 window 512, full head_dim 512; batch 2, 4096 tokens, bf16.
    # Chunks of 2048 (4 x 2 x 8/2 heads x 2048 x 6144 <= 512 MiB): full layers hold 2048 spare slots.
    assert prefill_chunk(public_plan("gemma-4-e2b"), 2, 2, 4096, 4096) == 2048
    sliding = 2 * 2 * 512 * 1 * 256 * 2
    full = 2 * 2 * (4096 + 2048) * 1 * 512 * 2
    assert 12 * sliding + 3 * full == 88_080_384
    assert kv_cache_bytes(public_plan("gemma-4-e2b"), tp=2, batch=2, seq_len=4096, dtype_bytes=2) == 88_080_384


def test_kv_cache_gemma4_12b_by_hand():
    # 48 layers, full where (i+1) % 6 == 0 -> 8 full, 40 sliding. Sliding: 8 KV heads / TP 2 = 4 per core, head_dim
    # 256, window 1024; full: 1 KV head x 512 (K=V shares the projection, not the cache: K is normed and rotated, V
    # only normed, so both are stored), replicated at TP 2; batch 1, 8192 tokens, bf16.
    # Chunks of 1024 (4 x 1 x 16/2 heads x 1024 x 9216 <= 512 MiB): full layers hold 1024 spare slots.
    assert prefill_chunk(public_plan("gemma-4-12b"), 2, 1, 8192, 8192) == 1024
    sliding = 2 * 1 * 1024 * 4 * 256 * 2
    full = 2 * 1 * (8192 + 1024) * 1 * 512 * 2
    assert 40 * sliding + 8 * full == 318_767_104
    assert kv_cache_bytes(public_plan("gemma-4-12b"), tp=2, batch=1, seq_len=8192, dtype_bytes=2) == 318_767_104


@pytest.mark.parametrize("instance", list(INSTANCES))
def test_gemma4_12b_plans_on_every_instance(instance, capsys):
    """`nxdi-gemma plan --model gemma-4-12b` on every instance of the table: it fits (bf16 weights ~24 GB: TP 2
    on the 2-core instances) and the KV cache is the hand-counted one at the chosen TP."""
    assert main(["plan", "--model", "gemma-4-12b", "--instance", instance, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"], result
    plan = public_plan("gemma-4-12b")
    tp, seq = result["tp"], result["seq_len"]
    chunk = prefill_chunk(plan, tp, 1, seq, seq)
    sliding = 2 * 1024 * max(1, 8 // tp) * 256 * 2
    full = 2 * (seq + (chunk if seq > chunk else 0)) * 1 * 512 * 2
    assert result["kv_cache_per_core"] == 40 * sliding + 8 * full == kv_cache_bytes(plan, tp, 1, seq, 2)


def test_sliding_layers_cost_only_their_window():
    plan = public_plan("gemma-3-1b")
    short = kv_cache_bytes(plan, 1, 1, 512, 2)
    long = kv_cache_bytes(plan, 1, 1, 4096, 2)
    full_layers = sum(1 for layer in plan.layers if not layer.window)
    # only the full layers grow past the window: 2 x (4096 - 512) x 1 head x 256 x 2 bytes each
    assert long - short == full_layers * 2 * (4096 - 512) * 256 * 2


def test_refusals_are_clear():
    plan = public_plan("gemma-3-27b")
    with pytest.raises(InputError, match=r"--tp 3 does not divide .*valid TP degrees: 1, 2, 4, 8, 16, 32"):
        memory_plan(plan, "trn1.32xlarge", tp=3)
    with pytest.raises(InputError, match="exceeds the model's maximum context of 131072"):
        memory_plan(plan, "trn1.32xlarge", tp=32, seq_len=200_000)
    with pytest.raises(InputError, match="exceeds the 2 NeuronCores"):
        memory_plan(plan, "inf2.xlarge", tp=4)
    with pytest.raises(InputError, match="unknown instance"):
        memory_plan(plan, "p5.48xlarge")


def test_fit_monotonic_and_big_models_do_not_fit_small_instances():
    assert not memory_plan(public_plan("gemma-3-27b"), "trn1.2xlarge").fits
    context, batch = largest_fit(public_plan("gemma-3-1b"), "inf2.xlarge")
    assert context >= 8192 and batch >= 1
    assert memory_plan(public_plan("gemma-3-1b"), "inf2.xlarge", seq_len=context).fits


def test_long_contexts_fit_now_that_prefill_is_chunked():
    # Issue 11: the context-encoding graph runs fixed-size chunks, so only the KV cache grows with the context.
    assert largest_fit(public_plan("gemma-4-31b"), "trn2.3xlarge", tp=4)[0] >= 131072
    assert largest_fit(public_plan("gemma-3-27b"), "trn1.32xlarge")[0] >= 131072
    plan = public_plan("gemma-3-1b")
    short = prefill_activation_bytes(plan, 1, 1, 4096, 4096, 2)
    long = prefill_activation_bytes(plan, 1, 1, 131072, 131072, 2)
    assert long <= 2 * short and long < 2 * 2**30


def test_largest_batch_is_reported_at_the_requested_context():
    plan = public_plan("gemma-3-4b")
    for seq_len in (4096, 32768):
        _, batch = largest_fit(plan, "inf2.xlarge", 2, seq_len=seq_len)
        assert batch >= 1
        assert memory_plan(plan, "inf2.xlarge", 2, batch, seq_len).fits
        assert batch == 1024 or not memory_plan(plan, "inf2.xlarge", 2, 2 * batch, seq_len).fits
    assert largest_fit(plan, "inf2.xlarge", 2, seq_len=32768)[1] < largest_fit(plan, "inf2.xlarge", 2, seq_len=4096)[1]


def test_plan_cli_from_directory_and_name(tmp_path, capsys):
    from nxdi_gemma.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "t", "gemma4")
    assert main(["plan", "--model", str(ckpt), "--instance", "inf2.xlarge", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] and doc["tp"] == 2  # default TP: all cores of the instance that the heads allow
    assert main(["plan", "--model", "gemma-2-9b", "--instance", "trn1.32xlarge", "--tp", "5"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_readme_instance_table_is_generated():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "update_readme.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_block_layout_kv_bytes():
    """Prefix caching's block layout stores every position on sliding layers too; decode still reads only the blocks
    inside the window."""
    from nxdi_gemma.planning import block_kv_cache_bytes, block_kv_decode_read_bytes, kv_cache_bytes, window_blocks
    from nxdi_gemma.public_models import public_plan

    plan = public_plan("gemma-3-27b")
    ring = kv_cache_bytes(plan, 1, 1, 32768, 2)
    per_position = sum(2 * layer.num_kv_heads * layer.head_dim * 2 for layer in plan.layers if not layer.shares_kv)
    # 1024 blocks of 32 and the block that takes padding writes, on every producer layer
    assert block_kv_cache_bytes(plan, 1, 1, 32768, 2, 32) == (32768 + 32) * per_position > ring
    assert window_blocks(1024, 32) == 33 and window_blocks(8, 8) == 2
    assert ring < block_kv_decode_read_bytes(plan, 1, 1, 32768, 2, 32) < 1.01 * ring


def test_speculation_plan_with_quantized_weights(capsys):
    """plan --draft honours --weights: both models' bytes shrink, so the roofline with and without the draft rises."""
    from nxdi_gemma.cli import main

    args = ["plan", "--model", "gemma-3-27b", "--draft", "gemma-3-1b", "--acceptance", "0.7", "--instance",
            "inf2.24xlarge", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--weights", "int8"]) == 0
    quant = json.loads(capsys.readouterr().out)
    assert quant["target_tokens_per_s"] > 1.5 * plain["target_tokens_per_s"]
    assert quant["speculative_tokens_per_s"] > 1.5 * plain["speculative_tokens_per_s"]
