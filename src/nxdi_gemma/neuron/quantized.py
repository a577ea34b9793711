"""Quantized weights on NxD's quantized layers (`quantized: true` in the neuron config, as in NxDI).

NxDI quantizes a model on device by swapping ColumnParallelLinear/RowParallelLinear for NxD's
QuantizedColumnParallel/QuantizedRowParallel (`neuronx_distributed.quantization.quantize.convert`, called by
`DecoderModelInstance.load_module`), but its CPU mode builds the model without that swap. `convert_model` therefore
runs the same swap, with the q_config NxDI builds from the same neuron-config fields, when our model is built: CPU
mode, XLA and device then run the same modules, and NxDI's own swap on device finds nothing left to convert (what
stays in the model dtype is in `neuron_config.modules_to_not_convert`, which `check_neuron_config` extends).

The weights come from a quantized checkpoint (`quantized_checkpoints_path`) written by `nxdi-gemma quantize`, or
written on first use from the model directory (NxDI's own `save_quantized_state_dict` goes through `load_hf_model`,
which we disable: it would unpickle and use transformers 4.57). Checked against NxD/NxDI 0.8 (cd3abf3) and 0.9
(c63afe0): quantization/{quantize,quantization_config,quantization_layers}.py are identical in both; NeuronConfig's
quantized, quantized_checkpoints_path, quantization_type, quantization_dtype, modules_to_not_convert,
activation_quantization_type, quantize_clamp_bound and `checkpoint_loader_fn(self, mmap=False)` are the same.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from neuronx_distributed.parallel_layers import parallel_state
from neuronx_distributed.quantization.quantization_config import (
    QuantizedDtype,
    get_default_custom_qconfig_dict,
    get_default_per_channel_custom_qconfig_dict,
)
from neuronx_distributed.quantization.quantize import convert
from torch import nn

from ..errors import ConfigError
from ..quantize import ALWAYS_NOT_CONVERTED, Scheme


def check_neuron_config(kwargs: dict) -> None:
    """Refuse, before NxDI's asserts, quantization settings our classes cannot run; extend modules_to_not_convert
    with what always stays in the model dtype; turn `kv_cache_quant` into NxDI's kv_quant_config. Runs on the raw
    NeuronConfig kwargs."""
    check_kv_cache_quant(kwargs)
    if not kwargs.get("quantized", False):
        if kwargs.get("quantized_checkpoints_path"):
            raise ConfigError("neuron config sets quantized_checkpoints_path without quantized=true; set both")
        return
    if not kwargs.get("quantized_checkpoints_path"):
        raise ConfigError("neuron config quantized=true needs quantized_checkpoints_path (a directory; written from "
                          "the model on first use if it does not exist)")
    if kwargs.get("activation_quantization_type"):
        raise ConfigError(f"neuron config activation_quantization_type={kwargs['activation_quantization_type']!r} "
                          "is not supported; nxdi-gemma quantizes weights only")
    if kwargs.get("quantized_mlp_kernel_enabled"):
        raise ConfigError("neuron config quantized_mlp_kernel_enabled is not supported (every NKI kernel is off)")
    kwargs.setdefault("quantization_type", "per_channel_symmetric")  # ours: per channel by default (NxDI: tensor)
    scheme = Scheme.from_neuron_config(_Fields(kwargs))
    if scheme.scheme == "per_tensor" and kwargs.get("fused_qkv"):
        raise ConfigError("neuron config fused_qkv with quantization_type=per_tensor_symmetric: q, k and v have "
                          "one scale each, the fused projection one; use per_channel_symmetric or fused_qkv=false")
    skip = list(kwargs.get("modules_to_not_convert") or [])
    kwargs["modules_to_not_convert"] = skip + [m for m in ALWAYS_NOT_CONVERTED if m not in skip]


KV_CACHE_DTYPES = {"f8e4m3": torch.float8_e4m3fn}


def check_kv_cache_quant(kwargs: dict) -> None:
    """`kv_cache_quant: true` (NxDI's switch; NxDI's KVCacheManager acts on `kv_quant_config`, which NxDI's own
    demo builds from it): K/V stored as fp8 e4m3 by a plain cast (NxDI's direct-cast KVQuantizationConfig, its
    default) and cast back where read. int8 and scaled (non-direct-cast) caches are refused: NxDI's scaled path
    keeps static scales of 1 that nothing calibrates, and an int8 cast without scales rounds K/V to integers."""
    config = kwargs.get("kv_quant_config")
    if not kwargs.get("kv_cache_quant", False):
        if config is not None:
            raise ConfigError("neuron config sets kv_quant_config without kv_cache_quant=true; set both")
        return
    config = dict(config or {})
    if not isinstance(kwargs.get("kv_quant_config") or {}, dict):
        raise ConfigError("neuron config kv_quant_config must be an object, e.g. {\"quant_dtype\": \"f8e4m3\"}")
    dtype = config.pop("quant_dtype", "f8e4m3")
    if dtype not in KV_CACHE_DTYPES and dtype not in KV_CACHE_DTYPES.values():
        raise ConfigError(f"neuron config kv_quant_config quant_dtype={dtype!r} is not supported: only f8e4m3 (a "
                          "direct cast; an int8 cache would need calibrated scales nothing provides)")
    if not config.pop("direct_cast", True) or config:
        raise ConfigError(f"neuron config kv_quant_config {kwargs['kv_quant_config']!r}: only the direct-cast "
                          "f8e4m3 cache is supported (no scales, no per-key/channel methods)")
    kwargs["kv_quant_config"] = {"quant_dtype": KV_CACHE_DTYPES.get(dtype, dtype), "direct_cast": True}


class _Fields:
    def __init__(self, kwargs: dict):
        self.__dict__.update(kwargs)


def q_config(neuron_config) -> dict:
    """NxD's q_config as NxDI's DecoderModelInstance.load_module builds it from the neuron config."""
    if neuron_config.quantization_type == "per_channel_symmetric":
        config = get_default_per_channel_custom_qconfig_dict()
    else:
        config = get_default_custom_qconfig_dict()
    config["quantized_dtype"] = QuantizedDtype.get_dtype(neuron_config.quantization_dtype)
    return config


@contextlib.contextmanager
def no_weight_init():
    """Build NxD's quantized layers without initialising their weights (NxD's AOT mode, as for tracing: they
    are loaded from the checkpoint). On CPU with TP > 1, QuantizedRowParallel's initialisation builds its master
    weight with the partitioned width (`_initialize_parameter_cpu` overwrites the TP-multiplied last dim with the
    packed width) and fails on every rank but 0 (NxD 0.8 cd3abf3's and 0.9's identical layers.py)."""
    previous = parallel_state.get_aot_mode()
    parallel_state.set_aot_mode(True)
    try:
        yield
    finally:
        parallel_state.set_aot_mode(previous)


def convert_model(model: nn.Module, neuron_config) -> None:
    """Swap the model's Column/RowParallelLinear layers for NxD's quantized ones, in place (NxD's `convert`)."""
    with no_weight_init():
        convert(model, q_config=q_config(neuron_config), inplace=True, mapping=None,
                modules_to_not_convert=list(neuron_config.modules_to_not_convert))


def quantized_dtype(neuron_config) -> torch.dtype | None:
    """The torch dtype of quantized weights, or None when the weights are not quantized."""
    if not neuron_config.quantized:
        return None
    return QuantizedDtype.get_dtype(neuron_config.quantization_dtype)


def load_checkpoint(qdir: str, model_dir: str | None, neuron_config, plan) -> dict[str, torch.Tensor]:
    """The checked quantized checkpoint's tensors under our HF names."""
    from ..quantize import check_quantized_checkpoint, load_quantized

    scheme = Scheme.from_neuron_config(neuron_config)
    check_quantized_checkpoint(qdir, model_dir, plan, scheme)
    return load_quantized(qdir, plan, scheme)


def ensure_checkpoint(model_path: str, neuron_config) -> None:
    """The quantized checkpoint exists (written now from model_path if not) and matches the config."""
    from ..quantize import ensure_quantized

    ensure_quantized(model_path, Path(neuron_config.quantized_checkpoints_path), Scheme.from_neuron_config(neuron_config))
