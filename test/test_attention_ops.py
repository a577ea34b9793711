"""The NxDI path's attention cores (ops.attention_over_segments, ops.sliding_chunk_attention) against HF's own
`eager_attention_forward` (transformers 5, Gemma 3 module) over the concatenated keys, in bfloat16.

NxDI attends the KV cache in place plus the active tokens, i.e. two key segments. HF runs one P @ V over all keys
and rounds once; with `fp32_accumulation` ours sums the segments' products in float32 and rounds once too, so the
two differ only where float32 summation order moves a rounding (values near zero; FP32_ORDER). Without it each
product is rounded first: a quarter of the outputs move by up to an ulp of the partial sums, which the same bound
catches. Float32 exactness of these cores is covered end to end by the simulation tier.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

from nxdi_gemma import ops

HEADS, KV_HEADS, DIM = 8, 2, 64
DTYPE = torch.bfloat16
# Outputs are O(1) (bf16 ulp 2^-7 near 1). A float32 summation-order difference over ~45 products of |p v| <= ~8
# is ~45 * 8 * 2^-24 = 2e-5 and moves a bf16 rounding only on outputs that small; a double rounding moves O(1)
# outputs by their ulp (1e-3 and more), so this bound tells the two apart.
FP32_ORDER = 2e-5


def hf_attention(q, k, v, visible, scale, cap):
    """HF eager attention; visible bool [B, 1, S, T] becomes HF's additive mask (dtype min where hidden)."""
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False, head_dim=q.shape[-1])
    mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill(~visible, torch.finfo(q.dtype).min)
    out, _ = eager_attention_forward(module, q, k, v, mask, scaling=scale, softcap=cap)
    return out.transpose(1, 2)  # [B, Nq, S, D], as ours


def tensors(seed: int, queries: int, keys: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)

    def make(*shape):
        return (torch.randn(*shape, generator=gen) * 2).to(DTYPE)

    return make(batch, HEADS, queries, DIM), make(batch, KV_HEADS, keys, DIM), make(batch, KV_HEADS, keys, DIM)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("cap", [None, 50.0])
@pytest.mark.parametrize("queries", [1, 4])  # decode (one active token), a prompt chunk after cached tokens
def test_two_segments_match_hf_in_bf16(queries: int, cap: float | None):
    # Sizes keep every elementwise op on whole CPU vectors, in HF's one score tensor and in our two segments:
    # ATen runs a flat tensor's tail through the scalar kernel, whose bf16 tanh (the softcap) can differ by an ulp
    # from the vectorized one on CPUs with AVX-512 bf16, a kernel artefact no device shares. 8 x 8 x S x T scores
    # with T in {40, S, 40 + S} are multiples of 64 for S in {1, 4}.
    cached, batch = 40, 8
    q, k, v = tensors(queries, queries, cached + queries, batch=batch)
    scale = 256 ** -0.5
    # The cache: rows see different prefixes (37 to all 40 slots); the active tokens: causal.
    seen = (37 + torch.arange(batch) % 4)[:, None]
    cache_visible = (torch.arange(cached)[None, :] < seen)[:, None, None, :].expand(-1, 1, queries, -1)
    i = torch.arange(queries)
    active_visible = (i[None, :] <= i[:, None])[None, None].expand(batch, 1, -1, -1)
    reference = hf_attention(q, k, v, torch.cat([cache_visible, active_visible], dim=-1), scale, cap)

    segments = [(k[:, :, :cached], v[:, :, :cached], cache_visible), (k[:, :, cached:], v[:, :, cached:],
                                                                       active_visible)]
    exact = ops.attention_over_segments(q, segments, scale, cap, fp32_accumulation=True)
    assert exact.dtype == DTYPE and exact.shape == reference.shape
    assert max_diff(exact, reference) <= FP32_ORDER
    rounded_twice = ops.attention_over_segments(q, segments, scale, cap)
    assert max_diff(rounded_twice, reference) > FP32_ORDER  # the gap the option closes


@pytest.mark.parametrize("first", [0, 3, 21])  # the ring empty, partly filled, full
def test_sliding_chunk_one_block_matches_hf_in_bf16(first: int):
    window, chunk = 8, 6
    q, k, v = tensors(100 + first, chunk, window + chunk)
    scale, cap = 0.125, 30.0
    # Keys: the ring read oldest first (positions first-W .. first-1; negative ones do not exist), then the chunk.
    key_pos = torch.arange(first - window, first + chunk)
    query_pos = torch.arange(first, first + chunk)
    visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)
    visible = (visible & (key_pos >= 0)[None, :])[None, None].expand(2, 1, -1, -1)
    reference = hf_attention(q, k, v, visible, scale, cap)
    ring_k, ring_v, chunk_k, chunk_v = k[:, :, :window], v[:, :, :window], k[:, :, window:], v[:, :, window:]
    first_position = torch.full((2, 1), first)
    exact = ops.sliding_chunk_attention(q, ring_k, ring_v, chunk_k, chunk_v, first_position, window, scale, cap,
                                        fp32_accumulation=True)
    assert max_diff(exact, reference) <= FP32_ORDER
    rounded_twice = ops.sliding_chunk_attention(q, ring_k, ring_v, chunk_k, chunk_v, first_position, window, scale,
                                                cap)
    if first:  # with an empty ring the prior segment's probabilities are all zero: nothing to round twice
        assert max_diff(rounded_twice, reference) > FP32_ORDER


@pytest.mark.parametrize("cap", [None, 50.0])
def test_shared_pool_segment_matches_hf_in_bf16(cap: float | None):
    """Decode over a block pool read in place (the block KV layout): every sequence's keys are slots of one shared
    [Nkv, T, D] pool, scattered in blocks, and its mask picks them; HF attends the same keys gathered in order."""
    batch, block, per_seq = 8, 4, 3  # 8 sequences of 3 blocks of 4 cached keys in a pool of 24 blocks + 1 spare
    pool_blocks = batch * per_seq + 1
    gen = torch.Generator().manual_seed(11)
    q, k_active, v_active = tensors(12, 1, 1, batch=batch)
    k_pool = (torch.randn(KV_HEADS, pool_blocks * block, DIM, generator=gen) * 2).to(DTYPE)
    v_pool = (torch.randn(KV_HEADS, pool_blocks * block, DIM, generator=gen) * 2).to(DTYPE)
    table = torch.randperm(batch * per_seq, generator=gen).reshape(batch, per_seq)  # like vLLM's, in no order
    seen = 9 + torch.arange(batch) % 4  # 9 to 12 cached keys per sequence
    slot = (table[:, :, None] * block + torch.arange(block)).reshape(batch, -1)  # [B, 12]: slot of position j
    logical = torch.arange(per_seq * block)[None, :].expand(batch, -1)
    key_pos = torch.full((batch, pool_blocks * block), 10**6).scatter(1, slot, logical)  # position held, per row
    pool_visible = (key_pos < seen[:, None])[:, None, None, :]
    gathered_k = torch.stack([k_pool[:, slot[b]] for b in range(batch)])  # [B, Nkv, 12, D]
    gathered_v = torch.stack([v_pool[:, slot[b]] for b in range(batch)])
    cache_visible = (logical < seen[:, None])[:, None, None, :]
    scale = 256 ** -0.5
    reference = hf_attention(q, torch.cat([gathered_k, k_active], dim=2), torch.cat([gathered_v, v_active], dim=2),
                             torch.cat([cache_visible, torch.ones(batch, 1, 1, 1, dtype=torch.bool)], dim=-1),
                             scale, cap)
    segments = [(k_pool, v_pool, pool_visible), (k_active, v_active, torch.ones(1, 1, 1, 1, dtype=torch.bool))]
    exact = ops.attention_over_segments(q, segments, scale, cap, fp32_accumulation=True)
    assert exact.shape == reference.shape
    assert max_diff(exact, reference) <= FP32_ORDER
