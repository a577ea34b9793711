"""Pure torch Gemma math, with the dtype behaviour of transformers (spec sections 2 and 6).

Stateless functions only; the modules in `layers` hold weights and call these. Everything here is traceable:
static shapes, no data-dependent Python control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, add_one: bool) -> torch.Tensor:
    """RMSNorm in float32, weight applied in float32, rounded once to x's dtype.

    add_one: Gemma 2/3 scale by (1 + w); Gemma 4 by w; weight None is Gemma 4's weightless norm.
    """
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        w = weight.float()
        y = y * (1.0 + w if add_one else w)
    return y.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), computed in x's dtype; identity when cap is None."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


def embed_scale(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """sqrt(H) rounded to the embedding dtype (HF multiplies by bf16(sqrt(H)) in a bf16 model; spec 2.1)."""
    return torch.tensor(math.sqrt(hidden_size), dtype=torch.float32).to(dtype)


def scaled_embedding(table: torch.Tensor, ids: torch.Tensor, hidden_size: int) -> torch.Tensor:
    return F.embedding(ids, table) * embed_scale(hidden_size, table.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., S, D] for the rotate-half layout: angles and trig in float32, then cast to dtype."""
    angles = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos/sin: [B, S, D]. Pairs dim j with j + D/2 (HF's rotate_half)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    logit_softcap: float | None,
) -> torch.Tensor:
    """Grouped-query attention core in HF's eager order (spec 2.5), heads first in and out.

    q: [B, Nq, S, D]; k, v: [B, Nkv, T, D] (KV head i serves query heads i*g .. i*g+g-1);
    visible: bool, broadcastable to [B, 1, S, T] (True = may attend). Scores and the softcap in q's dtype,
    softmax in float32, probabilities rounded to q's dtype before @ v. Returns [B, Nq, S, D].
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap(scores, logit_softcap)
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    logit_softcap: float | None,
) -> torch.Tensor:
    """`attention_heads`, with the heads merged: returns [B, S, Nq * D]."""
    out = attention_heads(q, k, v, visible, scale, logit_softcap)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def masked(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Scores with invisible keys at the dtype's lowest value. The fill value is a tensor of the scores' dtype: a
    Python float here would enter a traced graph as a float64 scalar."""
    lowest = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
    return torch.where(visible, scores, lowest)


def attention_over_segments(
    q: torch.Tensor,
    segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float,
    logit_softcap: float | None,
    fp32_accumulation: bool = False,
) -> torch.Tensor:
    """One softmax over the keys of several segments (e.g. a KV cache read in place and the active tokens' K/V),
    without concatenating or repeating K/V.

    q: [B, Nq, S, D]; each segment (k, v, visible): k, v [B, Nkv, T_i, D], or [Nkv, T_i, D] for keys every
    sequence of the batch shares (a block pool read in place: each sequence's mask picks its own slots); visible
    bool broadcastable to [B, 1, S, T_i]. Grouped-query attention folds each KV head's query heads into rows
    ([B, Nkv, g*S, D]; the whole batch's rows for shared keys, [Nkv, B*g*S, D]), so a cache is read once per KV
    head instead of copied to every query head. Only the scores (activations, S x sum T_i) are concatenated for the
    one float32 softmax of HF's eager order (spec 2.5); probabilities are rounded to q's dtype, and the segments'
    P @ V products are summed. Returns [B, Nq, S, D].

    In bfloat16 each product is rounded before the sum, where HF's single P @ V over all keys rounds once: about one
    bf16 ulp per attention output. fp32_accumulation sums the products in float32 and rounds once, as HF does, at
    the cost of float32 operands (a float32 copy of each V segment, the cache included, in a traced graph).
    """
    batch, heads, length, dim = q.shape
    kv_heads = segments[0][0].shape[-3]
    group = heads // kv_heads
    rows = q.reshape(batch, kv_heads, group * length, dim)
    shared_rows = rows.transpose(0, 1).reshape(kv_heads, batch * group * length, dim)

    def to_batch(x: torch.Tensor) -> torch.Tensor:  # [Nkv, B*g*S, X] -> [B, Nkv, g*S, X]
        return x.reshape(kv_heads, batch, group * length, x.shape[-1]).transpose(0, 1)

    def from_batch(x: torch.Tensor) -> torch.Tensor:  # [B, Nkv, g*S, X] -> [Nkv, B*g*S, X]
        return x.transpose(0, 1).reshape(kv_heads, batch * group * length, x.shape[-1])

    scores = []
    for k, _, visible in segments:
        r = shared_rows if k.dim() == 3 else rows
        if r.shape[-2] < k.shape[-2]:
            # Few query rows against many keys (decode): K @ Q^T contracts the cache in its stored layout, where
            # Q @ K^T would have the compiler materialise K^T, a copy of the whole cache per step (seen in XLA).
            raw = torch.matmul(k, r.transpose(-1, -2)).transpose(-1, -2)
        else:
            raw = torch.matmul(r, k.transpose(-1, -2))
        if k.dim() == 3:
            raw = to_batch(raw)
        s = softcap(raw * scale, logit_softcap)
        s = s.reshape(batch, kv_heads, group, length, k.shape[-2])
        scores.append(masked(s, visible.unsqueeze(2)))
    probs = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
    out, start = None, 0
    for k, v, _ in segments:
        part = probs[..., start:start + k.shape[-2]].reshape(batch, kv_heads, group * length, k.shape[-2])
        start += k.shape[-2]
        if k.dim() == 3:
            part = from_batch(part)
        term = torch.matmul(part.float(), v.float()) if fp32_accumulation else torch.matmul(part, v)
        if k.dim() == 3:
            term = to_batch(term)
        out = term if out is None else out + term
    return out.to(q.dtype).reshape(batch, heads, length, dim)


def sliding_chunk_attention(
    q: torch.Tensor,
    prior_k: torch.Tensor,
    prior_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first_position: torch.Tensor,
    window: int,
    scale: float,
    logit_softcap: float | None,
    fp32_accumulation: bool = False,
) -> torch.Tensor:
    """Sliding-window attention of a chunk of C consecutive tokens, in S x W memory and work (not S x S).

    q: [B, Nq, C, D]; k, v: [B, Nkv, C, D], the chunk at positions p0 .. p0+C-1 (first_position [B, 1] = p0);
    prior_k, prior_v: [B, Nkv, W, D], the W positions before the chunk, oldest first (p0-W .. p0-1; negative
    positions are empty and never visible). Each query sees q - W < k <= q (spec 2.6). Queries are taken in blocks
    of W: block b needs only the keys of two consecutive W-blocks of [prior, chunk], so the scores are
    [.., C, 2W]. Returns [B, Nq, C, D]. fp32_accumulation: as in `attention_over_segments`, which serves a chunk of at
    most W tokens (ring + chunk, two products); longer chunks take one product per block, rounded once already.
    """
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if length <= window:
        # One block: the prior ring and the chunk as two segments. Query i sees ring slot m (position p0-W+m)
        # iff m > i and that position exists, and chunk key j iff j <= i (the band is wider than the chunk).
        i = torch.arange(length, device=q.device, dtype=torch.int32)
        m = torch.arange(window, device=q.device, dtype=torch.int32)
        # Visible iff m > i and p0 - W + m >= 0: m >= max(i + 1, W - p0), one compare (no boolean `and`).
        lowest = torch.maximum(i[None, :, None] + 1, window - first_position.to(torch.int32)[:, :, None])
        prior_visible = m[None, None, :] >= lowest  # [B, C, W]
        causal = (i[None, :] <= i[:, None])[None]  # [1, C, C]
        return attention_over_segments(
            q, [(prior_k, prior_v, prior_visible[:, None]), (k, v, causal[:, None])], scale, logit_softcap,
            fp32_accumulation,
        )
    blocks = -(-length // window)
    pad = blocks * window - length
    if pad:  # padded queries are dropped; padded keys lie after every real query, so causality hides them
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    keys = torch.cat([prior_k, k], dim=2).view(batch, kv_heads, blocks + 1, window, dim)
    values = torch.cat([prior_v, v], dim=2).view(batch, kv_heads, blocks + 1, window, dim)
    # Block b's keys: positions p0 + bW - W .. p0 + bW + W - 1.
    block_k = torch.cat([keys[:, :, :-1], keys[:, :, 1:]], dim=3)
    block_v = torch.cat([values[:, :, :-1], values[:, :, 1:]], dim=3)
    rows = q.view(batch, kv_heads, group, blocks, window, dim).transpose(2, 3)
    rows = rows.reshape(batch, kv_heads, blocks, group * window, dim)
    scores = softcap(torch.matmul(rows, block_k.transpose(-1, -2)) * scale, logit_softcap)
    # Query r of a block (position p0 + bW + r) and key t (position p0 + bW - W + t): q - k = W + r - t.
    r = torch.arange(window, device=q.device, dtype=torch.int32)
    t = torch.arange(2 * window, device=q.device, dtype=torch.int32)
    # Visible iff r < t <= r + W and the key's position exists (>= 0): t >= max(r + 1, W - bW - p0) and
    # t <= r + W, combined with a select rather than a boolean `and` (the forms NxDI's masks use). Subtractions
    # only: an int32 negate is in none of NxDI's graphs (test_op_set.py).
    first_free = window - torch.arange(blocks, device=q.device, dtype=torch.int32) * window  # W - bW
    exists_from = first_free[None, :, None] - first_position.to(torch.int32).view(batch, 1, 1)  # [B, blocks, 1]
    lowest = torch.maximum(r[None, None, :, None] + 1, exists_from[:, :, :, None])  # [B, blocks, W, 1]
    in_band = (t[None, :] <= r[:, None] + window)[None, None]  # [1, 1, W, 2W]
    visible = torch.where(t[None, None, None, :] >= lowest, in_band, False)  # [B, blocks, W, 2W]
    scores = masked(scores.view(batch, kv_heads, blocks, group, window, 2 * window), visible[:, None, :, None])
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, blocks, group * window, 2 * window), block_v)
    out = out.view(batch, kv_heads, blocks, group, window, dim).transpose(2, 3)
    return out.reshape(batch, heads, blocks * window, dim)[:, :, :length]


def visibility(
    query_slots: torch.Tensor,
    key_slots: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Which keys each query sees (spec 2.6), as bool [B, 1, S, T].

    query_slots: [S] absolute slot index of each query; key_slots: [T] slot of each key (-1 = empty cache slot);
    key_valid: bool [B, T], False for padding. Sliding layers see q - W < k <= q (W keys including the query).
    """
    q = query_slots[:, None]
    k = key_slots[None, :]
    ok = (k <= q) & (k >= 0)
    if window is not None:
        ok = ok & (q - k < window)
    return (ok[None, :, :] & key_valid[:, None, :])[:, None]


def moe_routing(
    router_logits: torch.Tensor, top_k: int, per_expert_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma 4 router after the projection (spec 5.6): softmax over all experts in float32, top-k, renormalise,
    then the per-expert scale. Returns (weights float32 [N, k], expert indices [N, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * per_expert_scale.float()[experts]
    return weights, experts
