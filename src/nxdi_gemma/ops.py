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
