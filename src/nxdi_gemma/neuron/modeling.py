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
from neuronx_distributed_inference.modules.generation.sampling import create_sampler
from torch import nn

from .. import ops
from ..checkpoint import expected_shapes, load_state_dict
from ..config import GemmaPlan, LayerPlan
from ..layers import GemmaBlock, make_norm, per_layer_inputs
from . import state_dict as conversion
from .attention import ForwardState, NeuronGemmaAttention, sliding_mask
from .config import GemmaInferenceConfig, GemmaNeuronConfig
from .kv_cache import GemmaKVCacheManager
from .moe import ParallelMoeExperts


def parallel_linear_factory(dtype: torch.dtype):
    """Column-parallel in, row-parallel out: the MLP's intermediate activations stay sharded, one all-reduce."""

    def make(in_features: int, out_features: int, parallel: str) -> nn.Module:
        if parallel == "column":
            return ColumnParallelLinear(in_features, out_features, bias=False, gather_output=False, dtype=dtype)
        return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True, dtype=dtype)

    return make


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
