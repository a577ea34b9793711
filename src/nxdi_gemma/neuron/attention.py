"""Gemma attention on NxDI's NeuronAttentionBase: per-layer RoPE, Gemma's score scale and softcap, sliding masks.

Overrides checked against NxDI 0.8 (cd3abf3) and 0.9 (c63afe0): NeuronAttentionBase.prep_qkv_tensors, perform_prefill,
perform_prefill_windowed_attn, compute_for_token_gen, get_flash_attention_strategy (same signatures in both).
Untested on Trainium/Inferentia hardware.
"""

from __future__ import annotations

import torch
from neuronx_distributed_inference.modules.attention.attention_base import (
    FlashAttentionStrategy,
    NeuronAttentionBase,
)
from torch import nn

from .. import ops
from ..config import GemmaPlan, LayerPlan, RopeSpec
from ..layers import attention_norms, make_norm
from .config import GemmaInferenceConfig


class GemmaRotaryEmbedding(nn.Module):
    """cos/sin for one layer type. The frequencies are a float32 constant (not a buffer), so casting the model to
    bf16 cannot round them; angles and trig run in float32 and are cast to the activation dtype, as in HF."""

    def __init__(self, rope: RopeSpec):
        super().__init__()
        self.inv_freq_values = rope.inv_freq().tolist()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = torch.tensor(self.inv_freq_values, dtype=torch.float32, device=position_ids.device)
        return ops.rope_cos_sin(inv_freq, position_ids, x.dtype)


class ForwardState:
    """Tensors that one forward pass hands from earlier modules to later ones: the Gemma 4 per-layer inputs (made by
    the embedding, which alone sees the token ids) and each KV producer's K/V (read by the layers sharing it).
    Shared by reference and refilled in layer order within every traced forward, like a value flowing through."""

    def __init__(self):
        self.ple: torch.Tensor | None = None
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class NeuronGemmaAttention(NeuronAttentionBase):
    """Gemma attention on NxDI's projections, RoPE hook and cache plumbing, with Gemma's own core: score scale
    (query_pre_attn_scalar^-0.5, or 1.0 for Gemma 4), Gemma 2's tanh softcap before the mask, float32 softmax.
    The sliding window is a mask built by the decoder layer; `sliding_window` stays None here so NxDI's windowed
    path (its W-1 roll, which needs a bucket >= W-1) is never taken."""

    def __init__(self, config: GemmaInferenceConfig, plan: GemmaPlan, layer: LayerPlan, state: ForwardState):
        q_norm, k_norm, v_norm = attention_norms(plan, layer, folded=config.fold_norm_offset)
        if layer.shares_kv and q_norm is not None:
            k_norm = make_norm(plan, layer.head_dim, with_weight=False)  # NxDI wants both; this K is never read
        super().__init__(
            config=config,
            hidden_size=plan.hidden_size,
            num_attention_heads=layer.num_heads,
            num_key_value_heads=layer.num_kv_heads,
            head_dim=layer.head_dim,
            rotary_emb=GemmaRotaryEmbedding(layer.rope),
            rms_norm_eps=plan.rms_norm_eps,
            q_layernorm=q_norm,
            k_layernorm=k_norm,
        )
        self.gemma_scale = plan.attention_scale
        self.gemma_softcap = plan.attn_logit_softcap
        self.gemma_window = layer.window
        self.softmax_scale = 1.0 / plan.attention_scale  # NxDI 0.9 divides by this in paths we do not override
        self.v_norm = v_norm
        self.state = state
        self.layer_index, self.kv_source, self.shares_kv = layer.index, layer.kv_source, layer.shares_kv
        self.stores_kv = any(other.kv_source == layer.index and other.shares_kv for other in plan.layers)

    def prep_qkv_tensors(self, *args, **kwargs):
        """NxDI projects, q/k-norms and rotates; Gemma 4 adds the weightless V norm (V is never rotated) and KV
        sharing: a producer leaves its K/V (rotated K, normed V) for the layers that share them, which use those
        instead of their own."""
        Q, K, V, cos, sin, residual = super().prep_qkv_tensors(*args, **kwargs)
        if self.v_norm is not None:
            V = self.v_norm(V)
        if self.shares_kv:
            K, V = self.state.kv[self.kv_source]
        elif self.stores_kv:
            self.state.kv[self.layer_index] = (K, V)
        return Q, K, V, cos, sin, residual

    def get_flash_attention_strategy(self, q_len, has_attention_mask) -> FlashAttentionStrategy:
        return FlashAttentionStrategy.NONE

    def perform_prefill(self, Q, K, V, q_len, bsz, attention_mask):
        out = ops.attention_heads(Q, K, V, attention_mask.to(torch.bool), self.gemma_scale, self.gemma_softcap)
        return out, FlashAttentionStrategy.NONE

    def perform_prefill_windowed_attn(self, Q, K, V, q_len, bsz, attention_mask, window_size):
        return self.perform_prefill(Q, K, V, q_len, bsz, attention_mask)

    def compute_for_token_gen(self, Q, K, V, position_ids, past_key_value, attention_mask, active_mask,
                              is_prefix_caching=False):
        """One softmax over the cached keys (visible per `attention_mask`) and the active token(s)."""
        k_prior, v_prior = past_key_value
        prior_visible = attention_mask.to(torch.bool).expand(Q.shape[0], 1, Q.shape[2], k_prior.shape[2])
        if self.gemma_window is not None:
            # The ring holds position p at slot p % W; read it oldest first (from slot pos % W), the order HF's
            # cache has, so that bf16 sums round the same way.
            order = (torch.arange(self.gemma_window, device=Q.device)[None, :] + position_ids[:, :1]) % self.gemma_window
            index = order[:, None, :, None].expand(k_prior.shape)
            k_prior, v_prior = torch.gather(k_prior, 2, index), torch.gather(v_prior, 2, index.expand(v_prior.shape))
            prior_visible = torch.gather(prior_visible, 3, order[:, None, None, :].expand(prior_visible.shape))
        active_visible = torch.ones(Q.shape[0], 1, Q.shape[2], K.shape[2], dtype=torch.bool, device=Q.device)
        if Q.shape[2] > 1:
            active_visible = active_visible.tril()
        keys, values = torch.cat([k_prior, K], dim=2), torch.cat([v_prior, V], dim=2)
        visible = torch.cat([prior_visible, active_visible], dim=-1)
        return ops.attention_heads(Q, keys, values, visible, self.gemma_scale, self.gemma_softcap)


def sliding_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor, window: int, is_prefill: bool) -> torch.Tensor:
    """Visible keys of a sliding layer (spec 2.6: q - W < k <= q).

    Prefill: the causal mask [B, 1, S, S] and the band. Decode: the W-slot ring of `GemmaKVCacheManager` holds
    position p at slot p % W; before the current token is written at pos % W that slot still holds pos - W (out of
    the window) and slots >= pos are unfilled, so slot j is visible iff j < pos and j != pos % W.
    """
    if is_prefill:
        n = attention_mask.shape[-1]
        i = torch.arange(n, device=attention_mask.device)
        band = (i[:, None] - i[None, :]) < window
        return attention_mask.to(torch.bool) & band[None, None]
    pos = position_ids[:, :1]
    slot = torch.arange(window, device=position_ids.device)[None, :]
    visible = (slot < pos) & (slot != pos % window)
    return visible[:, None, None, :]


