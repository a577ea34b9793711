"""NxDI configuration classes for Gemma: every model field comes from the checkpoint's config.json, read by our own
parser (transformers 4.57 on Neuron machines has no Gemma 4 and misreads Gemma 3 configs saved by transformers 5).

Base classes checked against NxDI 0.8 (Neuron SDK 2.28, cd3abf3) and 0.9 (2.29, c63afe0): `InferenceConfig.__init__`
(neuron_config, fused_spec_config, load_config, metadata, **kwargs), `add_derived_config`, `get_required_attributes`,
`get_neuron_config_cls` and `NeuronConfig(**kwargs)` are identical in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from neuronx_distributed_inference.models.config import InferenceConfig, NeuronConfig

from ..config import FULL, GemmaPlan, plan_from_config, read_config_json, text_config_of
from ..errors import ConfigError
from ..planning import check_tp, prefill_chunk
from ..quantize import check_neuron_config as check_quantization

# NeuronConfig features our classes do not implement: refused instead of silently producing wrong outputs.
UNSUPPORTED_FLAGS = (
    "k_cache_transposed", "flash_decoding_enabled", "is_chunked_prefill", "is_medusa",
    "enable_eagle_speculation", "enable_token_tree", "kv_cache_tiling", "qkv_kernel_enabled", "qkv_nki_kernel_enabled",
    "mlp_kernel_enabled", "attn_block_tkg_nki_kernel_enabled", "attn_tkg_nki_kernel_enabled",
    "attn_tkg_builtin_kernel_enabled", "attn_block_cte_nki_kernel_enabled", "sequence_parallel_enabled",
    "apply_seq_ids_mask",
)


def _pop_flag(kwargs: dict[str, Any], name: str) -> bool:
    """One of our boolean neuron-config fields (default False), taken out of kwargs before NxDI sees them."""
    value = kwargs.pop(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"neuron config {name}={value!r} must be true or false")
    return value


class GemmaNeuronConfig(NeuronConfig):
    """NeuronConfig with the attention kernels off (our attention is plain torch, compiled by the Neuron compiler:
    Gemma's score scale, softcap and head dims up to 512 are outside what the NKI kernels implement).

    `fold_norm_offset` (ours, default False) lives here, not on the model config, because the neuron config is what
    vllm-neuron builds from `override_neuron_config` and what neuron_config.json reloads. False: Gemma 2/3 norms
    keep HF's weights and add 1 in float32 at run time, as HF does (bit-exact in bf16). True: `1 + w` is folded into
    the weights at conversion, rounded to the model dtype (3.7e-2 max logit diff on the Gemma 3 fixture in bf16);
    it would only pay off for a fused norm kernel reading raw weights, and every NKI kernel is off here.

    `attention_fp32_accumulation` (ours, default False): attention reads the KV cache in place, so the cache and the
    active tokens are two P @ V products; in bfloat16 each is rounded before their sum, where HF rounds one product
    over all keys once (about one bf16 ulp per attention output; the measured bf16 logit gap of the NxDI path). True
    sums the products in float32 and rounds once, as HF does (NxDI CPU mode: HF's bf16 tokens on every tier fixture,
    logits equal or about an ulp apart), at the cost of float32 operands: the decode graph converts the V cache to
    float32 every step. A bf16 validation mode, not for serving; no effect in float32. Untested on hardware.

    `quantize_lm_head` (ours, default False; needs `quantized: true`): the LM head's weight quantized too, with the
    decoder layers' dtype and scheme (one scale per vocab row by default; neuron/lm_head.py), the embedding table
    staying in the model dtype. The head is read in full every decode step (Gemma 3 1B: 302M of its 1B parameters),
    so this is the largest remaining decode-bandwidth saving; off by default, as in the issue's scheme, because the
    logits then move by the head's rounding too. The quantized checkpoint records whether it holds the quantized
    head, and loading refuses a checkpoint written the other way."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("attn_kernel_enabled", False)
        # NxDI turns KV cache tiling on by itself for fused speculation when max_length is a multiple of 128 > 128
        # (0.8 and 0.9); our per-layer caches are not tiled (and kv_cache_tiling is refused below).
        kwargs.setdefault("disable_kv_cache_tiling", True)
        fold = _pop_flag(kwargs, "fold_norm_offset")
        fp32_accumulation = _pop_flag(kwargs, "attention_fp32_accumulation")
        spare = kwargs.pop("speculation_spare_slots", 0)
        if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
            raise ConfigError(f"neuron config speculation_spare_slots={spare!r} must be an integer >= 0")
        chunk = kwargs.pop("prefill_chunk_size", None)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 2):
            raise ConfigError(f"neuron config prefill_chunk_size={chunk!r} must be an integer >= 2 (or omitted)")
        quantize_lm_head = _pop_flag(kwargs, "quantize_lm_head")
        check_quantization(kwargs, quantize_lm_head)  # quantized weights / KV cache: quantize.py, neuron/quantized.py
        super().__init__(**kwargs)
        self.fold_norm_offset = fold
        self.quantize_lm_head = quantize_lm_head
        self.attention_fp32_accumulation = fp32_accumulation
        # Prompt tokens per context-encoding call (None: chosen from the model in GemmaInferenceConfig).
        self.prefill_chunk_size = chunk
        enabled = [flag for flag in UNSUPPORTED_FLAGS if getattr(self, flag, False)]
        if self.attn_kernel_enabled:
            enabled.append("attn_kernel_enabled")
        if enabled:
            raise ConfigError(f"neuron config enables {enabled}, which nxdi-gemma does not support; remove them")
        if self.is_block_kv_layout != self.is_prefix_caching:
            raise ConfigError(f"neuron config is_block_kv_layout={self.is_block_kv_layout}, is_prefix_caching="
                              f"{self.is_prefix_caching}: nxdi-gemma's block KV layout is the prefix-caching one; "
                              "set both or neither")
        if self.is_block_kv_layout and not (self.pa_block_size and self.pa_num_blocks):
            raise ConfigError("block KV layout needs pa_block_size and pa_num_blocks in the neuron config "
                              f"(got {self.pa_block_size}, {self.pa_num_blocks})")
        if self.padding_side != "right":
            raise ConfigError(f"neuron config padding_side={self.padding_side!r}; nxdi-gemma supports 'right'")
        speculation = getattr(self, "speculation_length", 0)
        if speculation and not self.enable_fused_speculation:
            raise ConfigError(f"neuron config speculation_length={speculation} without enable_fused_speculation: "
                              "nxdi-gemma speculates only with NxDI's fused speculation (draft and target in one "
                              "graph); set enable_fused_speculation and give a draft")
        if self.enable_fused_speculation and speculation < 2:
            raise ConfigError(f"neuron config enable_fused_speculation with speculation_length={speculation}: it "
                              "must be K + 1 >= 2 (K draft proposals, K + 1 tokens verified per step)")
        # Positions a step may write past the last one it keeps (a fused step writes speculation_length tokens, of
        # which as few as one are kept). Copied with the neuron config into the draft's (NxDI and vllm-neuron
        # deep-copy the target's), whose own speculation_length is 0: both models' caches get the spare slots.
        self.speculation_spare_slots = max(spare, speculation - 1 if self.enable_fused_speculation else 0)


def gemma_load_config(model_path: str | Path):
    """A `load_config` callable for NxDI configs that reads config.json itself (no transformers AutoConfig)."""
    path = Path(model_path)

    def load(config: InferenceConfig) -> None:
        config._name_or_path = str(path)
        config.gemma_hf_config = read_config_json(path)
        text = text_config_of(config.gemma_hf_config)[1]
        hf_dtype = text.get("dtype", text.get("torch_dtype")) or config.gemma_hf_config.get("torch_dtype")
        neuron_config = config.neuron_config
        if hf_dtype and neuron_config is not None and not neuron_config.overrides_torch_dtype:
            neuron_config.torch_dtype = getattr(torch, hf_dtype)  # as NxDI's load_pretrained_config does

    return load


class GemmaInferenceConfig(InferenceConfig):
    """All Gemma fields derive from `gemma_hf_config` (the checkpoint's config.json, stored verbatim so that a
    compiled model's neuron_config.json reloads to the same plan)."""

    def __init__(self, neuron_config, fused_spec_config=None, load_config=None, metadata=None, **kwargs):
        if "fold_norm_offset" in kwargs:
            # Where nxdi-gemma kept it before it moved into the neuron config (also a neuron_config.json top-level
            # key of those builds): refused rather than guessed, since the compiled graph depends on it.
            raise ConfigError(f"fold_norm_offset={kwargs['fold_norm_offset']!r} given to the model config: set it "
                              "in the neuron config (neuron_config / override_neuron_config), and recompile models "
                              "compiled before it moved there")
        super().__init__(neuron_config, fused_spec_config=fused_spec_config, load_config=load_config,
                         metadata=metadata, **kwargs)

    @classmethod
    def get_neuron_config_cls(cls):
        return GemmaNeuronConfig

    def get_required_attributes(self) -> list[str]:
        return ["gemma_hf_config", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "vocab_size", "pad_token_id"]

    @property
    def fold_norm_offset(self) -> bool:
        """The neuron config's choice (a property, so neuron_config.json stores it once, inside neuron_config)."""
        # A plain NxDI NeuronConfig (not ours) cannot carry the field: the exact default.
        return getattr(self.neuron_config, "fold_norm_offset", False)

    @property
    def gemma_plan(self) -> GemmaPlan:
        return plan_from_config(self.gemma_hf_config, source=f"{getattr(self, '_name_or_path', '?')}/config.json")

    def add_derived_config(self) -> None:
        self.num_cores_per_group = 1
        if getattr(self, "gemma_hf_config", None) is None:
            # Loaded through NxDI's load_pretrained_config (transformers AutoConfig): re-read the file itself.
            self.gemma_hf_config = read_config_json(getattr(self, "_name_or_path", ""))
        plan = self.gemma_plan
        text = text_config_of(self.gemma_hf_config)[1]
        if hasattr(self, "text_config"):
            del self.text_config  # flattened below; NxDI reads get_text_config() for the vocab
        full = next((layer for layer in plan.layers if layer.attention_type == FULL), plan.layers[0])
        self.hidden_size = plan.hidden_size
        self.num_attention_heads = plan.num_heads
        self.num_key_value_heads = plan.layers[0].num_kv_heads
        self.head_dim = plan.layers[0].head_dim
        self.global_head_dim = full.head_dim
        self.num_hidden_layers = plan.num_layers
        self.vocab_size = plan.vocab_size
        self.intermediate_size = max(layer.intermediate_size for layer in plan.layers)
        self.rms_norm_eps = plan.rms_norm_eps
        self.max_position_embeddings = plan.max_position_embeddings
        self.pad_token_id = plan.pad_token_id if plan.pad_token_id is not None else 0
        self.tie_word_embeddings = plan.tie_word_embeddings
        self.hidden_act = text.get("hidden_activation", "gelu_pytorch_tanh")
        # Read by NxDI's forward when the caller does not say (transformers' PretrainedConfig defaults).
        for name, default in (("output_attentions", False), ("output_hidden_states", False), ("return_dict", True)):
            if not hasattr(self, name):
                setattr(self, name, default)
        tp = self.neuron_config.tp_degree
        check_tp(plan, tp, option="tp_degree")
        widths = {"hidden_size": plan.hidden_size}
        widths.update({f"layer {layer.index} MLP width": layer.intermediate_size for layer in plan.layers})
        widths.update({f"layer {layer.index} MoE width": layer.moe.intermediate_size for layer in plan.layers
                       if layer.moe})
        if plan.ple_dim:
            widths["per-layer-input width (layers x hidden_size_per_layer_input)"] = plan.num_layers * plan.ple_dim
        for what, width in widths.items():
            if width % tp:
                raise ConfigError(f"tp_degree={tp} does not divide the {what} ({width}); choose a TP that does")
        plan_prefill_chunks(self.neuron_config, plan)
        if self.neuron_config.max_length > plan.max_position_embeddings:
            raise ConfigError(
                f"neuron config max_length={self.neuron_config.max_length} exceeds the model's "
                f"max_position_embeddings={plan.max_position_embeddings}"
            )



class GemmaAssistantDraftConfig(GemmaInferenceConfig):
    """The draft config of a Gemma 4 assistant in fused speculation: the target's config (the assistant reads its
    caches and embedding) plus the assistant checkpoint's config.json (`assistant_hf_config`, stored verbatim)."""

    def get_required_attributes(self) -> list[str]:
        return [*super().get_required_attributes(), "assistant_hf_config"]

    @property
    def assistant_plan(self):
        from ..config import assistant_plan_from_config

        return assistant_plan_from_config(self.assistant_hf_config, "assistant config.json")


def plan_prefill_chunks(neuron_config: NeuronConfig, plan: GemmaPlan) -> None:
    """Prompts longer than `prefill_chunk_size` run as consecutive chunks through one context-encoding graph (its
    buckets capped at the chunk), each chunk reading the KV cache its predecessors wrote: activation memory grows
    with the chunk, not the prompt. Token generation keeps its buckets (one of seq_len unless the user set them).

    With the block KV layout (prefix caching) NxDI's own 2-D (prefill x prefix) buckets run each prompt's uncached
    part in one call: no chunks of ours (a prefill_chunk_size below max_context_length is refused)."""
    if neuron_config.is_block_kv_layout:
        chunk = neuron_config.prefill_chunk_size
        if chunk is not None and chunk < neuron_config.max_context_length:
            raise ConfigError(f"neuron config prefill_chunk_size={chunk} with the block KV layout (prefix caching): "
                              "prompts run through NxDI's prefill x prefix buckets; omit prefill_chunk_size")
        neuron_config.prefill_chunk_size = neuron_config.max_context_length
        return
    if neuron_config.prefill_chunk_size is None:
        neuron_config.prefill_chunk_size = prefill_chunk(plan, neuron_config.tp_degree, neuron_config.ctx_batch_size,
                                                         neuron_config.max_length, neuron_config.max_context_length)
    chunk = neuron_config.prefill_chunk_size
    if neuron_config.max_context_length <= chunk:
        return
    buckets = neuron_config.context_encoding_buckets if neuron_config.enable_bucketing else None
    buckets = sorted({b for b in (buckets or []) if b < chunk} | {chunk})
    if not neuron_config.enable_bucketing:
        neuron_config.token_generation_buckets = [neuron_config.seq_len]
        neuron_config.enable_bucketing = True
    neuron_config.context_encoding_buckets = buckets


def check_speculation(config: InferenceConfig) -> None:
    """NxDI fused speculation (`enable_fused_speculation`, `speculation_length` S = K + 1, the draft in
    `config.fused_spec_config`): what our classes run exactly is refused otherwise, one line, before anything is
    built or compiled. Greedy only; same vocabulary; the draft at the target's TP degree (NxDI's draft group);
    flat caches (not the block layout of prefix caching). Gives the draft's caches the target's spare slots."""
    neuron_config = config.neuron_config
    if not getattr(neuron_config, "enable_fused_speculation", False):
        return
    spec = neuron_config.speculation_length
    fused = getattr(config, "fused_spec_config", None)
    draft = getattr(fused, "draft_config", None)
    if draft is None:
        raise ConfigError("enable_fused_speculation needs a draft model (fused_spec_config with a draft_config)")
    sampling = neuron_config.on_device_sampling_config
    if sampling is None:
        raise ConfigError("fused speculation needs on-device sampling (NxDI's fused graph returns tokens): add "
                          "on_device_sampling_config (greedy) to the neuron config")
    # `dynamic` (per-request sampling parameters) stays allowed: vllm-neuron always sets it. NxDI's verification is
    # an argmax whenever do_sample is off (0.8 and 0.9), so tokens after a prefill's are the target's greedy ones.
    if sampling.do_sample:
        raise ConfigError("fused speculation with sampling (on_device_sampling_config do_sample) is not supported by "
                          "nxdi-gemma: NxDI's fused step verifies the draft's greedy proposals against the target's "
                          "argmax; use greedy decoding")
    if neuron_config.is_block_kv_layout:
        raise ConfigError("fused speculation with the block KV layout (prefix caching) is not supported by "
                          "nxdi-gemma; disable prefix caching")
    draft_vocab = getattr(draft, "vocab_size", None)
    if draft_vocab is not None and draft_vocab > config.vocab_size:
        raise ConfigError(f"the draft's vocabulary ({draft_vocab} tokens) is larger than the target's "
                          f"({config.vocab_size}); speculation needs a draft with the target's vocabulary")
    if hasattr(draft, "gemma_plan"):
        from ..speculation import check_draft

        check_draft(config.gemma_plan, draft.gemma_plan, spec - 1)
    elif draft_vocab != config.vocab_size:
        raise ConfigError(f"the draft's vocabulary ({draft_vocab} tokens) differs from the target's "
                          f"({config.vocab_size}); speculation needs a draft with the same vocabulary")
    draft_tp = draft.neuron_config.tp_degree
    if draft_tp != neuron_config.tp_degree:
        raise ConfigError(f"the draft's tp_degree {draft_tp} differs from the target's {neuron_config.tp_degree}: "
                          "nxdi-gemma runs the draft sharded at the target's TP; choose a draft that TP splits")
    if draft.neuron_config.is_block_kv_layout or getattr(draft.neuron_config, "enable_fused_speculation", False):
        raise ConfigError("the draft's neuron config must not enable fused speculation or the block KV layout")
    lengths = neuron_config.token_generation_buckets if neuron_config.enable_bucketing else None
    smallest = min(lengths or [neuron_config.seq_len])
    if spec >= smallest:
        raise ConfigError(f"speculation_length {spec} (K = {spec - 1} proposals + 1) does not fit the smallest "
                          f"token-generation bucket ({smallest}); use a smaller K")
    context = neuron_config.context_encoding_buckets if neuron_config.enable_bucketing else None
    if spec in (context or [neuron_config.max_context_length]) or spec == neuron_config.prefill_chunk_size:
        raise ConfigError(f"speculation_length {spec} equals a context-encoding length: NxDI tells a prompt chunk "
                          "from a verification by its length; choose another K or other buckets")
    if hasattr(draft, "assistant_plan"):
        from ..config import check_assistant_fits
        from .assistant import assistant_spare_slots, check_assistant_neuron_config, owner_tables

        check_assistant_fits(config.gemma_plan, draft.assistant_plan, "the assistant draft")
        check_assistant_neuron_config(neuron_config)
        owner_tables(draft.assistant_plan, config.gemma_plan, neuron_config.tp_degree)  # refuses a padded layout
        # The target's rings keep the assistant's window too (it reads them in place).
        neuron_config.speculation_spare_slots = max(
            neuron_config.speculation_spare_slots,
            assistant_spare_slots(config.gemma_plan, draft.assistant_plan, spec - 1))
    if hasattr(draft.neuron_config, "speculation_spare_slots"):
        draft.neuron_config.speculation_spare_slots = max(draft.neuron_config.speculation_spare_slots,
                                                          neuron_config.speculation_spare_slots)
