"""Quantized weights on NxD's quantized layers (`quantized: true` in the neuron config, as in NxDI).

NxDI quantizes a model on device by swapping ColumnParallelLinear/RowParallelLinear for NxD's
QuantizedColumnParallel/QuantizedRowParallel (`neuronx_distributed.quantization.quantize.convert`, called by
`DecoderModelInstance.load_module`), but its CPU mode builds the model without that swap. `convert_model` therefore
runs the same swap, with the q_config NxDI builds from the same neuron-config fields, when our model is built: CPU
mode, XLA and device then run the same modules, and NxDI's own swap on device finds nothing left to convert (what
stays in the model dtype is in `neuron_config.modules_to_not_convert`, which `quantize.check_neuron_config`
extends).

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

from ..quantize import Scheme


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
