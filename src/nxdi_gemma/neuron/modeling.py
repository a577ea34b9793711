"""NxD Inference modeling classes for Gemma 2 / 3 text decoders (Gemma 4 shares them, see the Gemma 4 notes below).

Thin wiring around the shared pieces: the plan (`nxdi_gemma.config`), the Gemma math (`ops`, `layers`: norms, MLP,
block wiring, attention core) and the weight conversion (`neuron.state_dict`). What is Neuron-specific here:
tensor-parallel linears and embedding, NeuronAttentionBase hooks, per-layer KV cache shapes, and masks.

Every base class and override below was checked against NxDI 0.8 (Neuron SDK 2.28, cd3abf3) and 0.9 (2.29, c63afe0):
NeuronBaseForCausalLM (forward, _is_prefill, get_state_dict, convert_hf_to_neuron_state_dict,
update_state_dict_for_tied_weights, load_hf_model, checkpoint_loader_fn, save_quantized_state_dict),
NeuronBaseModel (setup_attr_for_model, init_model, init_inference_optimization, create_attn_mask), NeuronAttentionBase (forward, prep_qkv_tensors, get_o_proj; see
attention.py), KVCacheManager (see kv_cache.py), ParallelEmbedding / ColumnParallelLinear / RowParallelLinear,
create_sampler. `softmax_scale=` (0.9 only) is never passed. Untested on Trainium/Inferentia hardware: verified in
NxDI's CPU mode and as XLA graphs (test/sim) only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from neuronx_distributed.parallel_layers.mappings import _gather_along_dim
from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM, NeuronBaseModel
from neuronx_distributed_inference.modules.generation.sampling import create_sampler
from neuronx_distributed_inference.modules.lora_serving import is_lora_module
from torch import nn

from .. import ops
from ..checkpoint import expected_shapes, load_state_dict
from ..config import GemmaPlan, LayerPlan
from ..layers import GemmaBlock, GemmaMLP, make_norm, per_layer_inputs
from . import quantized
from . import state_dict as conversion
from .attention import ForwardState, NeuronGemmaAttention
from .block_kv import GemmaBlockKVCacheManager
from .config import GemmaInferenceConfig, GemmaNeuronConfig, check_speculation
from .kv_cache import GemmaKVCacheManager
from .lm_head import QuantizedSoftcapColumnParallel, SoftcapColumnParallelLinear
from .lora import GemmaLoraModelManager
from .moe import ParallelMoeExperts
from .quantized import quantized_dtype


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


class AdapterMLP(GemmaMLP):
    """GemmaMLP whose linears get the batch's LoRA adapter ids when NxDI's LoRA serving has wrapped them.

    NxDI (`wrap_model_with_lora`, modules/lora_serving, 0.8 and 0.9) replaces every linear named in the LoRA
    target_modules by a MultiLoraModule whose forward is `(x, adapter_ids)`; NxDI hands adapter_ids to each decoder
    layer, which keeps them in `state.adapter_ids` for this module (the attention passes its own to the q/k/v/o
    projections). Unwrapped linears are called as before."""

    def __init__(self, hidden: int, intermediate: int, linear, state: ForwardState):
        super().__init__(hidden, intermediate, linear)
        self.state = state

    def _linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x, adapter_ids=self.state.adapter_ids) if is_lora_module(module) else module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = ops.gelu_tanh(self._linear(self.gate_proj, x)) * self._linear(self.up_proj, x)
        return self._linear(self.down_proj, hidden)


class NeuronGemmaDecoderLayer(GemmaBlock):
    """The shared Gemma block (norms, MLP, residuals) around NxDI attention. Returns cos/sin as None so NxDI's
    layer loop cannot hand one layer type's RoPE table to the next layer."""

    def __init__(self, config: GemmaInferenceConfig, plan: GemmaPlan, layer: LayerPlan, state: ForwardState):
        dtype = config.neuron_config.torch_dtype
        weights_dtype = quantized_dtype(config.neuron_config)  # None unless `quantized`
        experts = ParallelMoeExperts(plan.hidden_size, layer.moe, dtype, weights_dtype) if layer.moe else None
        linear = parallel_linear_factory(dtype)
        super().__init__(plan, layer, NeuronGemmaAttention(config, plan, layer, state), linear,
                         folded_norms=config.fold_norm_offset, experts=experts,
                         mlp=AdapterMLP(plan.hidden_size, layer.intermediate_size, linear, state))
        self.state, self.index = state, layer.index

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, **kwargs):
        for handed_over in ("cos_cache", "sin_cache", "residual", "local_mask"):
            kwargs.pop(handed_over, None)
        self.state.adapter_ids = kwargs.get("adapter_ids")  # for AdapterMLP (attention takes it from kwargs)
        out = self.self_attn(
            hidden_states=self.attention_input(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_value=past_key_value, cos_cache=None, sin_cache=None, **kwargs,
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
        head = dict(gather_output=not self.on_device_sampling, dtype=dtype, softcap=plan.final_logit_softcap)
        if config.neuron_config.quantized:
            quantized.convert_model(self, config.neuron_config)  # NxD's swap, here so that CPU mode runs it too
        if getattr(config.neuron_config, "quantize_lm_head", False):  # opt-in; NxD's swap never touches the head
            with quantized.no_weight_init():
                self.lm_head = QuantizedSoftcapColumnParallel(plan.hidden_size, plan.vocab_size, **head,
                                                              q_config=quantized.q_config(config.neuron_config))
        else:
            self.lm_head = SoftcapColumnParallelLinear(plan.hidden_size, plan.vocab_size, **head)

    def init_inference_optimization(self, config: GemmaInferenceConfig) -> None:
        if self.on_device_sampling:
            self.sampler = create_sampler(config.neuron_config, self.lm_head.tensor_parallel_group.size())
        if config.neuron_config.is_block_kv_layout:
            self.kv_mgr = GemmaBlockKVCacheManager(config, self.layers, global_rank=self.rank_util)
        else:
            self.kv_mgr = GemmaKVCacheManager(config, self.layers, global_rank=self.rank_util, state=self.state)

    def forward(self, *args, **kwargs):
        """NxDI's forward. With LoRA serving it also returns the active LoRA weights after the caches (`outputs +=
        lora_weights`, 0.8 and 0.9), aliased on device to the `weight_active` tensors token generation reads. NxDI's
        CPU mode (`on_cpu`: eager, nothing aliased) would copy them into the KV cache list with the caches
        (`_copy_past_key_values`, ModelWrapper.forward) and fail; there they are written to those tensors here, as
        the device's aliasing does, and left out of the outputs. Traced graphs are unchanged."""
        outputs = super().forward(*args, **kwargs)
        if self.neuron_config.lora_config is None or not self.neuron_config.on_cpu:
            return outputs
        tensors = self.lora_weight_manager.get_lora_tensors()
        for tensor, new in zip(tensors, outputs[len(outputs) - len(tensors):], strict=True):
            tensor.data = new
        return outputs[: len(outputs) - len(tensors)]

    def _sample_on_device(self, logits, sampling_params, is_for_speculation, is_for_context_encoding):
        """NxDI's, except greedy sampling in CPU mode (`on_cpu`) on sharded logits: there NxDI's sampler takes each
        rank's local argmax (a TP > 1 token is then wrong; 0.8 and 0.9) and the greedy verification of fused
        speculation ([B, S, V/TP] logits) runs NxD's distributed argmax, a Neuron custom op. Both become
        torch.argmax over the logits gathered across the TP group (first maximum, as HF's argmax): [B] tokens, or
        [B, S] for a verification, as NxDI returns them. Device graphs are unchanged."""
        sampling = self.neuron_config.on_device_sampling_config
        group = self.lm_head.tensor_parallel_group
        # NxDI's own conditions: a verification is an argmax unless do_sample; the sampler is greedy unless
        # do_sample or dynamic (per-request parameters).
        if is_for_speculation:
            ours = not sampling.do_sample
        else:
            ours = not (sampling.do_sample or sampling.dynamic) and group.size() > 1
        if not (self.neuron_config.on_cpu and ours):
            return super()._sample_on_device(logits, sampling_params, is_for_speculation, is_for_context_encoding)
        if group.size() > 1:
            logits = _gather_along_dim(logits, partition_dim=2, process_group=group)
        if is_for_speculation:
            return torch.argmax(logits, dim=2).to(torch.int32)
        return torch.argmax(logits[:, -1, :], dim=-1).to(torch.int32)

    def update_weights_for_lora(self, model_sd: dict) -> dict:
        """NxDI's LoRA weight loading (NeuronBaseModel.update_weights_for_lora, 0.8 and 0.9: each LoRA slot filled
        from the adapter weights of the same layer and projection), then K=V layers (Gemma 4): V is the K projection
        there (the V projection holds K's weights, `state_dict.py`), so it gets K's adapter too, as HF, which has no
        V projection in those layers and applies the k_proj adapter to the K it also uses as V."""
        model_sd = super().update_weights_for_lora(model_sd)
        for layer in self.config.gemma_plan.layers:
            if not layer.k_eq_v or layer.shares_kv:
                continue
            prefix = f"layers.{layer.index}.self_attn.qkv_proj."
            for part in ("lora_A", "lora_B"):
                k_name, v_name = f"{prefix}k_proj.{part}.weight", f"{prefix}v_proj.{part}.weight"
                if k_name in model_sd and v_name in model_sd:
                    model_sd[v_name] = model_sd[k_name].clone()
        return model_sd

    def create_attn_mask(self, attention_mask, is_for_context_encoding, is_for_speculation, position_ids=None,
                         **kwargs):
        """NxDI's masks, unchanged (our attention derives its masks from the positions); context encoding also
        keeps which tokens of the chunk are real ([B, C] from the 2-D mask) for the cache writes."""
        if is_for_context_encoding:
            self.state.valid = attention_mask.to(torch.bool)
        if self.is_prefix_caching:
            # The bucket's prefix size, which NxDI's forward reads (0.8 and 0.9). Its ModelWrapper.get sets it per
            # compiled bucket; in CPU mode no bucket is loaded and it would stay 0. The bucket's prefix is the
            # width of the mask NxDI pads to it (a 1-element placeholder when there is no prefix): static.
            self.prefix_size = attention_mask.shape[-1] if attention_mask.dim() == 2 else 0
        return super().create_attn_mask(attention_mask, is_for_context_encoding, is_for_speculation,
                                        position_ids=position_ids, **kwargs)


class NeuronGemmaForCausalLM(NeuronBaseForCausalLM):
    """Gemma 2 / Gemma 3 (text and the text part of the multimodal checkpoints) causal LM for NxD Inference."""

    _model_cls = NeuronGemmaModel

    def __init__(self, model_path: str, config: GemmaInferenceConfig | None = None, neuron_config=None):
        """NxDI's, after refusing fused-speculation setups we do not run exactly (`config.check_speculation`, which
        also sizes the draft's caches: before NxDI copies the config into its submodels); with LoRA serving, NxDI's
        adapter manager replaced by ours (naming the adapter and why when a request or vLLM asks for one it does not
        serve)."""
        if config is None:
            config = self.get_config_cls().load(model_path)  # what NxDI's __init__ does without a config
        check_speculation(config)
        super().__init__(model_path, config, neuron_config)
        if self.neuron_config.lora_config is not None:
            self.lora_model_manager = GemmaLoraModelManager(self.neuron_config.lora_config)

    def enable_context_encoding(self, **model_init_kwargs):
        """NxDI's (which builds the context-encoding model, then `enable_fused_spec` the fused one, both from
        `self._model_cls`, set to NeuronFusedSpecModel by NxDI's __init__ just before; 0.8 and 0.9). With a Gemma 4
        assistant as the draft, both are our GemmaAssistantSpecModel (neuron/assistant.py)."""
        fused = getattr(self.config, "fused_spec_config", None)
        if self.neuron_config.enable_fused_speculation and hasattr(getattr(fused, "draft_config", None),
                                                                   "assistant_plan"):
            from .assistant import GemmaAssistantSpecModel

            self._model_cls = GemmaAssistantSpecModel
        super().enable_context_encoding(**model_init_kwargs)

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
        if config.neuron_config.quantized:  # NxDI hands us quantized_checkpoints_path (checked by the loader below)
            state = quantized.load_checkpoint(model_name_or_path, getattr(config, "_name_or_path", None),
                                              config.neuron_config, plan)
        else:
            state = load_state_dict(Path(model_name_or_path), plan, expected_shapes(plan), dtype=None)
        state = cls.convert_hf_to_neuron_state_dict(state, config)
        # Fused speculation: NxDI's checkpoint loader sets the class's _FUSED_PREFIX to "draft_model" for the draft,
        # then to "target_model" for the target, and never resets it (0.8 and 0.9); the names get that prefix, as
        # in NxDI's own get_state_dict. A model of the same class built later without speculation keeps the stale
        # "target_model": only a fused target (or the draft) gets a prefix.
        fused = cls._FUSED_PREFIX == "draft_model" or config.neuron_config.enable_fused_speculation
        if fused and cls._FUSED_PREFIX:
            state = {f"{cls._FUSED_PREFIX}.{name}": value for name, value in state.items()}
        return state

    @classmethod
    def save_quantized_state_dict(cls, model_path: str, config: GemmaInferenceConfig) -> None:
        """What vllm-neuron calls before compiling a `quantized` model. NxDI's goes through load_hf_model (disabled:
        it would unpickle and use transformers 4.57): ours writes the quantized safetensors checkpoint from the
        model's safetensors if quantized_checkpoints_path does not exist yet, and otherwise checks it."""
        quantized.ensure_checkpoint(model_path, config.neuron_config)

    def checkpoint_loader_fn(self, mmap: bool = False):
        """NxDI's loader; with quantized weights, the quantized checkpoint is first written from the model directory
        if it does not exist yet (NxDI would raise FileNotFoundError), and checked against the config."""
        if self.neuron_config.quantized:
            quantized.ensure_checkpoint(self.model_path, self.neuron_config)
        return super().checkpoint_loader_fn(mmap)

    @staticmethod
    def convert_hf_to_neuron_state_dict(state_dict: dict, config: GemmaInferenceConfig) -> dict:
        return conversion.convert_hf_to_neuron_state_dict(
            state_dict, config.gemma_plan, config.neuron_config.tp_degree, config.neuron_config.fused_qkv,
            fold_norm_offset=config.fold_norm_offset,
        )

    @staticmethod
    def update_state_dict_for_tied_weights(state_dict: dict) -> None:
        state_dict.setdefault("lm_head.weight", state_dict["embed_tokens.weight"].clone())

    def _is_prefill(self, position_ids: torch.Tensor) -> bool:
        """A call with more than one token per sequence is a prompt chunk, run by the context-encoding graph. NxDI
        asks whether positions start at 0, which every chunk after the first does not."""
        return position_ids.shape[-1] > 1

    def forward(self, input_ids=None, seq_ids=None, attention_mask=None, position_ids=None, *args, **kwargs):
        """NxDI's forward, with prompts longer than `prefill_chunk_size` run as consecutive chunks through the one
        context-encoding graph (each chunk attends the cache the previous ones wrote). Host code, not traced."""
        chunk = self.neuron_config.prefill_chunk_size
        if not isinstance(input_ids, torch.Tensor) or input_ids.shape[-1] <= chunk:
            return super().forward(input_ids, seq_ids, attention_mask, position_ids, *args, **kwargs)
        batch, length = input_ids.shape
        if attention_mask is None:
            # What NxDI infers for the whole prompt (vllm-neuron passes positions only): token i is real iff its
            # position is >= i.
            attention_mask = (torch.ones_like(input_ids) if position_ids is None else
                              (position_ids >= torch.arange(length)[None, :]).to(position_ids.dtype))
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        starts = list(range(0, length, chunk))
        if length - starts[-1] == 1:
            starts[-1] -= 1  # a one-token chunk would be routed to token generation: end on two tokens instead
        last_token = attention_mask.long().sum(-1) - 1  # per sequence
        combined = None
        for begin, end in zip(starts, [*starts[1:], length], strict=True):
            out = super().forward(input_ids[:, begin:end], seq_ids, attention_mask[:, begin:end],
                                  position_ids[:, begin:end], *args, **kwargs)
            # Each sequence's next-token output comes from the chunk holding its last prompt token.
            mine = (last_token >= begin) & (last_token < end)
            combined = out if combined is None else _select_rows(combined, out, mine)
        return combined

    def _get_model_outputs(self, *args, **kwargs):
        """NxDI's. In CPU mode (`on_cpu`, eager: nothing aliased) a fused-speculation model returns its four
        outputs (accepted tokens [B, S] padded with -1, next input ids, next attention mask, next positions; then
        draft and target logits with output_logits) followed by the caches of draft and target; NxDI's forward then
        keeps only the first tensor where a device returns them all. Grouped here as [outputs] + caches, so the
        result's `fused_outputs` holds what the device's would and `_copy_past_key_values` gets the caches. Device
        runs are unchanged."""
        fused_cpu = self.neuron_config.enable_fused_speculation and self.neuron_config.on_cpu
        rows = None
        if fused_cpu and args[0].shape[-1] == 1 and args[0].shape[0] < self.neuron_config.tkg_batch_size:
            args, rows = self._pad_fused_rows(args)
        outputs, on_neuron = super()._get_model_outputs(*args, **kwargs)
        if self.neuron_config.enable_fused_speculation and not on_neuron:
            count = 6 if self.neuron_config.output_logits else 4
            head = outputs[:count] if rows is None else [t.index_select(0, rows) for t in outputs[:count]]
            outputs = [list(head), *outputs[count:]]
        return outputs, on_neuron

    def _pad_fused_rows(self, args: tuple) -> tuple[tuple, torch.Tensor]:
        """CPU mode, a fused step for fewer rows than the compiled batch (continuous batching): padded here as
        NxDI's ModelWrapper pads on a device (the missing seq ids appended, rows sorted by seq id, inputs repeated
        from the first row), since its CPU-mode padding path cannot take the fused model's outputs (0.8 and 0.9).
        Returns the padded positional arguments and, per given row, its row in the padded batch."""
        input_ids, attention_mask, position_ids, seq_ids, sampling_params = args[:5]
        given = seq_ids.reshape(-1).tolist()
        padded = torch.tensor(sorted(given + [i for i in range(self.neuron_config.tkg_batch_size) if i not in given]),
                              dtype=seq_ids.dtype)
        source = torch.tensor([given.index(i) if i in given else 0 for i in padded.tolist()])
        rows = torch.tensor([padded.tolist().index(i) for i in given])
        take = [t.index_select(0, source) for t in (input_ids, attention_mask, position_ids)]
        sampling = sampling_params.index_select(0, source) if isinstance(sampling_params, torch.Tensor) else sampling_params
        return (*take, padded, sampling, *args[5:]), rows

    def _copy_past_key_values(self, outputs) -> None:
        """CPU mode: the caches a call returned become every submodel's (what aliasing does on a device). NxDI's
        own fused-speculation branch (0.8 and 0.9) reads attributes its model wrappers do not have and assumes two
        caches per layer (ours: per KV producer), so fused speculation is handled here."""
        if not self.neuron_config.enable_fused_speculation:
            super()._copy_past_key_values(outputs)
            return
        caches = outputs[1:]
        owners = [self.context_encoding_model.model, self.fused_spec_model.model]
        draft_count = len(owners[0].draft_model.kv_mgr.past_key_values)
        for owner in {id(o): o for o in owners}.values():  # one model serves both without continuous batching
            for params, new in ((owner.draft_model.kv_mgr.past_key_values, caches[:draft_count]),
                                (owner.target_model.kv_mgr.past_key_values, caches[draft_count:])):
                for param, tensor in zip(params, new, strict=True):
                    param.data = tensor

    @staticmethod
    def load_hf_model(model_path, **kwargs):
        from ..errors import CheckpointError

        raise CheckpointError(f"{model_path}: give a local checkpoint directory with safetensors weights")

    if not hasattr(NeuronBaseForCausalLM, "_get_captured_tensors_offset"):
        # NxDI 0.9 (c63afe0) calls this on its CPU path without defining it (defined from ef2731e on).
        def _get_captured_tensors_offset(self) -> int:
            capture = getattr(self.neuron_config, "tensor_capture_config", None)
            return capture.get_offset() if capture else 0


def _select_rows(previous, current, take_current: torch.Tensor):
    """NxDI's output object with rows of `current` where take_current, else `previous` (logits, tokens, hidden)."""
    def pick(new, old):
        if isinstance(new, list) and isinstance(old, list):  # fused speculation: [accepted tokens, next ids, ...]
            return [pick(n, o) for n, o in zip(new, old, strict=True)]
        if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape:
            return torch.where(take_current.view(-1, *([1] * (new.dim() - 1))), new, old)
        return new

    for name in ("logits", "tokens", "hidden_states", "fused_outputs"):
        if getattr(current, name, None) is not None:
            setattr(current, name, pick(getattr(current, name), getattr(previous, name, None)))
    return current


# The names vLLM's architecture lookup and users expect; one implementation serves every generation.
NeuronGemma2ForCausalLM = NeuronGemmaForCausalLM
NeuronGemma3ForCausalLM = NeuronGemmaForCausalLM
NeuronGemma4ForCausalLM = NeuronGemmaForCausalLM
NeuronGemma4UnifiedForCausalLM = NeuronGemmaForCausalLM  # Gemma 4 12B (gemma4_unified): its text decoder
