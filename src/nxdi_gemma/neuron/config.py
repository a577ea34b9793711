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
from ..planning import check_tp

# NeuronConfig features our classes do not implement: refused instead of silently producing wrong outputs.
UNSUPPORTED_FLAGS = (
    "k_cache_transposed", "flash_decoding_enabled", "is_block_kv_layout", "is_prefix_caching", "is_medusa",
    "enable_fused_speculation", "kv_cache_tiling", "qkv_kernel_enabled", "qkv_nki_kernel_enabled",
    "mlp_kernel_enabled", "attn_block_tkg_nki_kernel_enabled", "attn_tkg_nki_kernel_enabled",
    "attn_tkg_builtin_kernel_enabled", "attn_block_cte_nki_kernel_enabled", "quantized", "sequence_parallel_enabled",
    "apply_seq_ids_mask",
)


class GemmaNeuronConfig(NeuronConfig):
    """NeuronConfig with the attention kernels off (our attention is plain torch, compiled by the Neuron compiler:
    Gemma's score scale, softcap and head dims up to 512 are outside what the NKI kernels implement)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("attn_kernel_enabled", False)
        super().__init__(**kwargs)
        enabled = [flag for flag in UNSUPPORTED_FLAGS if getattr(self, flag, False)]
        if self.attn_kernel_enabled:
            enabled.append("attn_kernel_enabled")
        if enabled:
            raise ConfigError(f"neuron config enables {enabled}, which nxdi-gemma does not support; remove them")
        if self.padding_side != "right":
            raise ConfigError(f"neuron config padding_side={self.padding_side!r}; nxdi-gemma supports 'right'")
        if getattr(self, "speculation_length", 0):
            raise ConfigError("speculative decoding (speculation_length > 0) is not supported by nxdi-gemma yet")


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
        super().__init__(neuron_config, fused_spec_config=fused_spec_config, load_config=load_config,
                         metadata=metadata, **kwargs)

    @classmethod
    def get_neuron_config_cls(cls):
        return GemmaNeuronConfig

    def get_required_attributes(self) -> list[str]:
        return ["gemma_hf_config", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "vocab_size", "pad_token_id"]

    @property
    def gemma_plan(self) -> GemmaPlan:
        return plan_from_config(self.gemma_hf_config, source=f"{getattr(self, '_name_or_path', '?')}/config.json")

    def add_derived_config(self) -> None:
        self.num_cores_per_group = 1
        # True: Gemma 2/3 norm weights hold `1 + w` (what fused kernels read); False: HF's float32 `1 + w` at run
        # time, bit-exact in bf16 (see neuron/state_dict.py).
        if not hasattr(self, "fold_norm_offset"):
            self.fold_norm_offset = True
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
        if self.neuron_config.max_length > plan.max_position_embeddings:
            raise ConfigError(
                f"neuron config max_length={self.neuron_config.max_length} exceeds the model's "
                f"max_position_embeddings={plan.max_position_embeddings}"
            )
