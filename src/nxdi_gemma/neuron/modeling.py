"""NxD Inference modeling classes for Gemma 2 / 3 text decoders (Gemma 4 shares them, see the Gemma 4 notes below).

Thin wiring around the shared pieces: the plan (`nxdi_gemma.config`), the Gemma math (`ops`, `layers`: norms, MLP,
block wiring, attention core) and the weight conversion (`neuron.state_dict`). What is Neuron-specific here:
tensor-parallel linears and embedding, NeuronAttentionBase hooks, per-layer KV cache shapes, and masks.

Every base class and override below was checked against NxDI 0.8 (Neuron SDK 2.28, cd3abf3) and 0.9 (2.29, c63afe0):
NeuronBaseForCausalLM/NeuronBaseModel (setup_attr_for_model, init_model, init_inference_optimization, get_state_dict,
convert_hf_to_neuron_state_dict, update_state_dict_for_tied_weights), NeuronAttentionBase (perform_prefill,
perform_prefill_windowed_attn, compute_for_token_gen, get_flash_attention_strategy: same signatures in both),
KVCacheManager (get_kv_by_layer_id, update_kv_by_layer_id, _get_index_to_update_new_position, _fetch_cache),
ParallelEmbedding / ColumnParallelLinear / RowParallelLinear, create_sampler. `softmax_scale=` (0.9 only) is never
passed. Untested on Trainium/Inferentia hardware: verified in NxDI's CPU mode only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM, NeuronBaseModel
from neuronx_distributed_inference.modules.attention.attention_base import (
    FlashAttentionStrategy,
    NeuronAttentionBase,
)
from neuronx_distributed_inference.modules.generation.sampling import create_sampler
from neuronx_distributed_inference.modules.kvcache.kv_cache_manager import KVCacheManager
from torch import nn

from .. import ops
from ..checkpoint import expected_shapes, load_state_dict
from ..config import GemmaPlan, LayerPlan, MoeSpec, RopeSpec
from ..layers import GemmaBlock, attention_norms, make_norm, per_layer_inputs
from . import state_dict as conversion
from .config import GemmaInferenceConfig, GemmaNeuronConfig


def parallel_linear_factory(dtype: torch.dtype):
    """Column-parallel in, row-parallel out: the MLP's intermediate activations stay sharded, one all-reduce."""

    def make(in_features: int, out_features: int, parallel: str) -> nn.Module:
        if parallel == "column":
            return ColumnParallelLinear(in_features, out_features, bias=False, gather_output=False, dtype=dtype)
        return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True, dtype=dtype)

    return make


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


class GemmaEmbedding(ParallelEmbedding):
    """Gemma's embedding: the table lookup times sqrt(H) rounded to the table's dtype (spec 2.1), sharded across the
    hidden dim. With PLE (Gemma 4 E2B/E4B) it also computes the per-layer inputs once per forward (spec 5.7). The
    PLE table ([V, L*P]: 2.3B rows x cols on E2B) is sharded across its L*P columns like the main table, so each
    core stores 1/TP of it and a lookup gathers only S*L*P values; its projection is column-parallel, gathered."""

    def __init__(self, plan: GemmaPlan, state: ForwardState, dtype: torch.dtype):
        super().__init__(plan.vocab_size, plan.hidden_size, plan.pad_token_id, dtype=dtype,
                         shard_across_embedding=True)
        self.plan, self.state = plan, state
        if plan.ple_dim:
            width = plan.num_layers * plan.ple_dim
            self.embed_tokens_per_layer = ParallelEmbedding(plan.ple_vocab_size, width, dtype=dtype,
                                                            shard_across_embedding=True)
            self.per_layer_model_projection = ColumnParallelLinear(plan.hidden_size, width, bias=False,
                                                                   gather_output=True, dtype=dtype)
            self.per_layer_projection_norm = make_norm(plan, plan.ple_dim)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_)
        out = out * ops.embed_scale(self.plan.hidden_size, out.dtype)
        self.state.kv.clear()
        if self.plan.ple_dim:
            self.state.ple = per_layer_inputs(self.plan, input_, out, self.embed_tokens_per_layer,
                                              self.per_layer_model_projection, self.per_layer_projection_norm)
        return out


class SoftcapColumnParallelLinear(ColumnParallelLinear):
    """LM head with the final logit softcap; elementwise, so correct on a vocab shard and on gathered logits."""

    def __init__(self, *args, softcap: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.softcap = softcap

    def forward(self, input_: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return ops.softcap(super().forward(input_, *args, **kwargs), self.softcap)


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


class NeuronGemmaDecoderLayer(GemmaBlock):
    """The shared Gemma block (norms, MLP, residuals) around NxDI attention. Returns cos/sin as None so NxDI's
    layer loop cannot hand one layer type's RoPE table to the next layer."""

    def __init__(self, config: GemmaInferenceConfig, plan: GemmaPlan, layer: LayerPlan, state: ForwardState):
        dtype = config.neuron_config.torch_dtype
        experts = ParallelMoeExperts(plan.hidden_size, layer.moe, dtype) if layer.moe else None
        super().__init__(plan, layer, NeuronGemmaAttention(config, plan, layer, state),
                         parallel_linear_factory(dtype), folded_norms=config.fold_norm_offset, experts=experts)
        self.window, self.state, self.index = layer.window, state, layer.index

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, **kwargs):
        for handed_over in ("cos_cache", "sin_cache", "residual", "local_mask"):
            kwargs.pop(handed_over, None)
        is_prefill = kwargs.get("is_for_context_encoding", past_key_value is None)
        mask = attention_mask
        if self.window is not None:
            mask = sliding_mask(attention_mask, position_ids, self.window, is_prefill)
        out = self.self_attn(
            hidden_states=self.attention_input(hidden_states), attention_mask=mask, position_ids=position_ids,
            past_key_value=past_key_value, cos_cache=None, sin_cache=None, **kwargs,
        )
        ple = None if self.state.ple is None else self.state.ple[:, :, self.index]
        hidden_states = self.after_attention(hidden_states, out[0], ple)
        return hidden_states, out[1], None, None, None


class ParallelMoeExperts(nn.Module):
    """Gemma 4 routed experts, tensor parallel: gate/up are column-parallel and down row-parallel over the
    flattened (intermediate, expert) axis (see `state_dict.experts_to_neuron`), so each rank holds a 1/TP slice of
    every expert's width and the per-token routing weights apply locally; the row-parallel down projection sums
    experts and ranks. Static shapes: every expert runs on every token (correct; E/k times the routed FLOPs)."""

    def __init__(self, hidden: int, moe: MoeSpec, dtype: torch.dtype):
        super().__init__()
        self.num_experts = moe.num_experts
        width = moe.num_experts * moe.intermediate_size
        self.gate_proj = ColumnParallelLinear(hidden, width, bias=False, gather_output=False, dtype=dtype)
        self.up_proj = ColumnParallelLinear(hidden, width, bias=False, gather_output=False, dtype=dtype)
        self.down_proj = RowParallelLinear(width, hidden, bias=False, input_is_parallel=True, dtype=dtype)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32, device=x.device)
        dense = dense.scatter(1, experts, weights)  # [N, E] routing weight, 0 for unselected experts
        gate = self.gate_proj(x).view(x.shape[0], -1, self.num_experts)
        up = self.up_proj(x).view(x.shape[0], -1, self.num_experts)
        h = (ops.gelu_tanh(gate) * up * dense[:, None, :].to(x.dtype)).reshape(x.shape[0], -1)
        return self.down_proj(h)


class GemmaKVCacheManager(KVCacheManager):
    """Per-layer cache shapes: full layers hold max_length slots (sliced to the bucket when read), sliding layers a
    ring of W slots written at position % W, each with its own KV heads and head dim."""

    def __init__(self, config: GemmaInferenceConfig, layers: nn.ModuleList, global_rank):
        plan = config.gemma_plan
        # The base allocates one cache per layer from this mapping; give it 1-slot stubs and build ours below.
        super().__init__(config, num_kv_head=config.num_key_value_heads, global_rank=global_rank,
                         layer_to_cache_size_mapping=[1] * plan.num_layers)
        batch = config.neuron_config.kv_cache_batch_size + config.neuron_config.kv_cache_padding_size
        self.windows = [layer.window for layer in plan.layers]
        self.producers = plan.kv_producers
        # KV-shared layers own no cache: they read their source layer's slot.
        slot = {index: n for n, index in enumerate(self.producers)}
        self.slot_of = [slot[layer.kv_source] for layer in plan.layers]
        self.k_shapes = self.v_shapes = [
            (batch, layers[i].self_attn.num_key_value_heads, plan.layers[i].window or config.neuron_config.max_length,
             plan.layers[i].head_dim)
            for i in self.producers
        ]
        self.past_key_values = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, dtype=self.cache_dtype), requires_grad=False)
            for shape in self.k_shapes for _ in ("k", "v")
        )

    def _fetch_cache(self, idx: int, kvcache_buffer=None):
        return super()._fetch_cache(self.slot_of[idx], kvcache_buffer)

    def get_cache(self, seq_len: int, skip_slice=False, kvcache_buffer=None, seq_ids=None, **kwargs):
        return [
            list(self.get_kv_by_layer_id(idx=idx, seq_len=seq_len, skip_slice=skip_slice,
                                         kvcache_buffer=kvcache_buffer, seq_ids=seq_ids, **kwargs))
            for idx in range(len(self.windows))
        ]

    def update_cache(self, is_for_context_encoding, seq_ids, position_ids, new_key_values, seq_len, **kwargs):
        """Write the producers' new K/V; returns [k, v] per cache slot, in slot order (what NxDI aliases)."""
        updated = []
        for idx in self.producers:
            updated.extend(self.update_kv_by_layer_id(
                idx=idx, is_for_context_encoding=is_for_context_encoding, seq_ids=seq_ids,
                position_ids=position_ids, kv_per_layer=new_key_values[idx], seq_len=seq_len, **kwargs,
            ))
        return updated

    def get_kv_by_layer_id(self, idx, seq_len: int, skip_slice=False, kvcache_buffer=None, **kwargs):
        k_cache, v_cache = self._fetch_cache(idx, kvcache_buffer)
        if self.kv_cache_padding_size > 0:
            k_cache, v_cache = k_cache[: -self.kv_cache_padding_size], v_cache[: -self.kv_cache_padding_size]
        if self.windows[idx] is None and not skip_slice:
            k_cache, v_cache = k_cache[:, :, :seq_len], v_cache[:, :, :seq_len]
        return k_cache, v_cache

    def update_kv_by_layer_id(self, idx, is_for_context_encoding, seq_ids, position_ids, kv_per_layer, seq_len,
                              **kwargs):
        window = self.windows[idx]
        if window is not None and is_for_context_encoding:
            kv_per_layer = tuple(ring_from_prefill(t, position_ids, window) for t in kv_per_layer)
        return super().update_kv_by_layer_id(
            idx=idx, is_for_context_encoding=is_for_context_encoding, seq_ids=seq_ids, position_ids=position_ids,
            kv_per_layer=kv_per_layer, seq_len=seq_len, **kwargs,
        )

    def _get_index_to_update_new_position(self, seq_ids, scatter_index, position_ids, full_k, transposed, layer_idx):
        window = self.windows[layer_idx]
        if window is not None:
            position_ids = position_ids % window
        return position_ids.view(-1, 1, position_ids.shape[-1], 1).expand_as(full_k)


def ring_from_prefill(kv: torch.Tensor, position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """The W-slot ring after a prefill: slot j holds the latest position p <= last with p % W == j.
    kv: [B, H, S, D] for positions 0..S-1 (right padded); returns [B, H, W, D] (slots past the prompt hold
    position 0's values and stay masked until written)."""
    last = position_ids.amax(dim=1, keepdim=True)  # [B, 1]
    slot = torch.arange(window, device=kv.device)[None, :]
    source = (last - torch.remainder(last - slot, window)).clamp(min=0)  # [B, W]
    index = source[:, None, :, None].expand(kv.shape[0], kv.shape[1], window, kv.shape[3])
    return torch.gather(kv, 2, index)


class NeuronGemmaModel(NeuronBaseModel):
    def setup_attr_for_model(self, config: GemmaInferenceConfig) -> None:
        self.on_device_sampling = config.neuron_config.on_device_sampling_config is not None
        self.tp_degree = config.neuron_config.tp_degree
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.max_batch_size = config.neuron_config.max_batch_size
        self.buckets = config.neuron_config.buckets
        self.sliding_window = None  # per layer (masks + GemmaKVCacheManager); a model-level window hits every layer

    def init_model(self, config: GemmaInferenceConfig) -> None:
        plan = config.gemma_plan
        dtype = config.neuron_config.torch_dtype
        self.padding_idx = config.pad_token_id
        self.vocab_size = plan.vocab_size
        self.state = ForwardState()
        self.embed_tokens = GemmaEmbedding(plan, self.state, dtype)
        self.layers = nn.ModuleList(NeuronGemmaDecoderLayer(config, plan, layer, self.state) for layer in plan.layers)
        self.norm = make_norm(plan, plan.hidden_size, folded=config.fold_norm_offset)
        self.lm_head = SoftcapColumnParallelLinear(
            plan.hidden_size, plan.vocab_size, bias=False, gather_output=not self.on_device_sampling, pad=True,
            dtype=dtype, softcap=plan.final_logit_softcap,
        )

    def init_inference_optimization(self, config: GemmaInferenceConfig) -> None:
        if self.on_device_sampling:
            self.sampler = create_sampler(config.neuron_config, self.lm_head.tensor_parallel_group.size())
        self.kv_mgr = GemmaKVCacheManager(config, self.layers, global_rank=self.rank_util)


class NeuronGemmaForCausalLM(NeuronBaseForCausalLM):
    """Gemma 2 / Gemma 3 (text and the text part of the multimodal checkpoints) causal LM for NxD Inference."""

    _model_cls = NeuronGemmaModel

    @classmethod
    def get_config_cls(cls):
        return GemmaInferenceConfig

    @classmethod
    def get_neuron_config_cls(cls):
        return GemmaNeuronConfig

    @classmethod
    def get_state_dict(cls, model_name_or_path: str, config: GemmaInferenceConfig) -> dict:
        """Our safetensors loader (strict names and shapes, multimodal prefixes, never unpickles), then conversion."""
        plan = config.gemma_plan
        state = load_state_dict(Path(model_name_or_path), plan, expected_shapes(plan), dtype=None)
        return cls.convert_hf_to_neuron_state_dict(state, config)

    @staticmethod
    def convert_hf_to_neuron_state_dict(state_dict: dict, config: GemmaInferenceConfig) -> dict:
        return conversion.convert_hf_to_neuron_state_dict(
            state_dict, config.gemma_plan, config.neuron_config.tp_degree, config.neuron_config.fused_qkv,
            fold_norm_offset=config.fold_norm_offset,
        )

    @staticmethod
    def update_state_dict_for_tied_weights(state_dict: dict) -> None:
        state_dict.setdefault("lm_head.weight", state_dict["embed_tokens.weight"].clone())

    @staticmethod
    def load_hf_model(model_path, **kwargs):
        from ..errors import CheckpointError

        raise CheckpointError(f"{model_path}: give a local checkpoint directory with safetensors weights")

    if not hasattr(NeuronBaseForCausalLM, "_get_captured_tensors_offset"):
        # NxDI 0.9 (c63afe0) calls this on its CPU path without defining it (defined from ef2731e on).
        def _get_captured_tensors_offset(self) -> int:
            capture = getattr(self.neuron_config, "tensor_capture_config", None)
            return capture.get_offset() if capture else 0


# The names vLLM's architecture lookup and users expect; one implementation serves every generation.
NeuronGemma2ForCausalLM = NeuronGemmaForCausalLM
NeuronGemma3ForCausalLM = NeuronGemmaForCausalLM
NeuronGemma4ForCausalLM = NeuronGemmaForCausalLM
