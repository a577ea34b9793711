"""Gemma attention on NxDI's NeuronAttentionBase: per-layer RoPE, Gemma's score scale and softcap, sliding masks.

Checked against NxDI 0.8 (cd3abf3) and 0.9 (c63afe0): NeuronAttentionBase.__init__, forward (our own: NxDI's dispatches
to kernels and windowed paths we do not use), prep_qkv_tensors, get_o_proj and NeuronAttentionBaseOutput have the
same signatures in both. Untested on Trainium/Inferentia hardware.
"""

from __future__ import annotations

import torch
from neuronx_distributed_inference.modules.attention.attention_base import (
    NeuronAttentionBase,
    NeuronAttentionBaseOutput,
)
from torch import nn

from .. import ops
from ..config import GemmaPlan, LayerPlan, RopeSpec
from ..layers import attention_norms, make_norm
from .block_kv import block_attention
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
        self.valid: torch.Tensor | None = None  # context encoding: bool [B, C], False for padding tokens
        self.adapter_ids: torch.Tensor | None = None  # LoRA serving: the batch's adapter slots (modeling.AdapterMLP)


class NeuronGemmaAttention(NeuronAttentionBase):
    """Gemma attention on NxDI's projections, RoPE hook and cache plumbing, with Gemma's own core: score scale
    (query_pre_attn_scalar^-0.5, or 1.0 for Gemma 4), Gemma 2's tanh softcap before the mask, float32 softmax.
    `forward` is ours (NxDI's dispatches to kernels and windowed paths we do not use); `sliding_window` stays None
    so NxDI never applies its own window."""

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
        # A plain NxDI NeuronConfig (not ours) cannot carry the field: the default.
        self.fp32_accumulation = getattr(config.neuron_config, "attention_fp32_accumulation", False)
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

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_value=None, adapter_ids=None,
                rotary_position_ids: torch.Tensor | None = None, kv_mgr=None, residual=None, **kwargs):
        """Projections, norms and RoPE through NxDI (`prep_qkv_tensors`), then Gemma's attention core.

        Context encoding runs one chunk of the prompt (positions p0 .. p0+C-1, p0 = position_ids[:, 0]) against the
        cache written by the previous chunks (`GemmaKVCacheManager.prefill_prior`), so one fixed-size graph serves
        every chunk of a long prompt; token generation attends the cache in place plus the active token. Masks
        come from the positions alone: slot j of a full cache holds position j; a sliding ring holds the latest
        position congruent to j mod W. Returns the chunk's (or token's) new K/V for the cache manager to write."""
        original_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.torch_dtype)
        batch, length, _ = hidden_states.shape
        Q, K, V, cos, sin, residual = self.prep_qkv_tensors(
            position_ids if rotary_position_ids is None else rotary_position_ids, hidden_states, past_key_value,
            adapter_ids=adapter_ids, residual=residual,
        )
        if getattr(kv_mgr, "block_layout", False):
            out = block_attention(self, Q, K, V, position_ids, kv_mgr, kwargs.get("active_block_table"),
                                  kwargs.get("kvcache_buffer"), kwargs["is_for_context_encoding"])
        elif past_key_value is None:
            prior = kv_mgr.prefill_prior(self.layer_index, kwargs.get("seq_ids"), batch, kwargs.get("kvcache_buffer"))
            out = self.chunk_attention(Q, K, V, position_ids, prior)
        else:
            out = self.decode_attention(Q, K, V, position_ids, past_key_value)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = self.get_o_proj()(out, adapter_ids=adapter_ids).to(original_dtype)
        return NeuronAttentionBaseOutput(out, (K, V), cos, sin, residual)

    def chunk_attention(self, Q, K, V, position_ids, prior):
        """A prompt chunk: sliding layers see the ring (read oldest first) and the chunk within the band, in
        C x 2W blocks; full layers see the cache slots before p0 (`prior` None: the prompt always fits one chunk,
        so there is nothing before it) and the chunk causally."""
        first = position_ids[:, :1].to(torch.int32)
        length = Q.shape[2]
        if self.gemma_window is not None:
            window, ring = self.gemma_window, prior[0].shape[2]  # ring: W slots, or W + S - 2 under speculation
            # Slot (p0 - W + i) % R holds position p0 - W + i (if it exists): the last W, oldest first.
            # Positions are >= 0, so fmod is the modulo (one op; torch.remainder's sign handling is several).
            order = torch.fmod(first + (ring - window) + torch.arange(window, device=Q.device, dtype=torch.int32)[None, :],
                               ring)
            batch, heads, _, dim = prior[0].shape
            index = order[:, None, :, None].to(torch.int64).expand(batch, heads, window, dim)
            prior_k, prior_v = (torch.gather(t, 2, index) for t in prior)
            return ops.sliding_chunk_attention(Q, prior_k, prior_v, K, V, first, window, self.gemma_scale,
                                               self.gemma_softcap, self.fp32_accumulation)
        i = torch.arange(length, device=Q.device, dtype=torch.int32)
        segments = [(K, V, (i[None, :] <= i[:, None])[None, None])]
        if prior is not None:
            slots = torch.arange(prior[0].shape[2], device=Q.device, dtype=torch.int32)
            segments.insert(0, (prior[0], prior[1], (slots[None, :] < first)[:, None, None, :]))
        return ops.attention_over_segments(Q, segments, self.gemma_scale, self.gemma_softcap,
                                           self.fp32_accumulation)

    def decode_attention(self, Q, K, V, position_ids, past_key_value):
        """Token generation: the cache in place (no copy, no per-head repeat) and the active token(s)."""
        k_prior, v_prior = past_key_value
        pos = position_ids[:, :1].to(torch.int32)
        slots = torch.arange(k_prior.shape[2], device=Q.device, dtype=torch.int32)[None, :]
        # Active token i (position pos + i: one token, or S = K + 1 verified by fused speculation) sees the active
        # tokens j <= i within the window, and the cache slots holding positions before pos.
        i = torch.arange(Q.shape[2], device=Q.device, dtype=torch.int32)
        active = i[None, :] <= i[:, None]
        if self.gemma_window is not None:
            # Slot j holds position pos-1 - ((pos-1-j) mod R) of a ring of R slots, in [pos-R, pos-1] (pos-1-j+R
            # >= 0: fmod is the modulo), if every position before pos was written in order. A slot holding a
            # position >= pos instead (written by a verification whose tokens were rejected, at most S-1 past the
            # last kept one) is taken for one R earlier, out of every query's window since R >= W + S - 2. Token i
            # sees held >= max(0, pos+i-W+1). One compare per query, no boolean `and`.
            window, ring = self.gemma_window, k_prior.shape[2]
            held = pos - 1 - torch.fmod(pos - 1 - slots + ring, ring)
            lowest = torch.maximum(pos + i[None, :] - window + 1, torch.zeros_like(pos))  # [B, Q]
            prior_visible = (held[:, None, :] >= lowest[:, :, None])[:, None]  # [B, 1, Q, slots]
            if Q.shape[2] > window:  # static: more active tokens than the window (never at S <= W)
                active = active & (i[:, None] - i[None, :] < window)
        else:
            prior_visible = (slots < pos)[:, None, None, :]
        segments = [(k_prior, v_prior, prior_visible), (K, V, active[None, None])]
        return ops.attention_over_segments(Q, segments, self.gemma_scale, self.gemma_softcap,
                                           self.fp32_accumulation)
