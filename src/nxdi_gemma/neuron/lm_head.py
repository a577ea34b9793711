"""The LM head: final logit softcap and a vocabulary the TP degree need not divide, in the model dtype
(`SoftcapColumnParallelLinear`, the default) or with quantized weights (`QuantizedSoftcapColumnParallel`, neuron
config `quantize_lm_head: true` with `quantized: true`).

Why both layouts pad themselves: NxD's `pad=True` strips the padding when it gathers, yet NxDI's model forward (0.8
cd3abf3 and 0.9 c63afe0: `mask_padded_logits` after `lm_head` whenever it has a `pad_size`) then sets the last
`pad_size` columns of those already unpadded logits to finfo.min: the last real tokens could never be generated. So:
- gathered logits (no on-device sampling): the padding is ours (`vocab_pad`, no `pad_size` attribute, so NxDI
  masks nothing) and the pad columns are cut after the gather: exactly the vocabulary's columns leave the graph;
- sharded logits (on-device sampling): NxD's own `pad=True`; NxDI's mask is right there (the last rank's last
  `pad_size` columns are the padding) and keeps the sampler off them. Logits gathered for `output_logits` keep
  the padded width, the pad columns at finfo.min.

The quantized head is NxD's QuantizedColumnParallel (quantization/quantization_layers.py, identical in NxD 0.8 and
0.9): `x @ q^T` in the compute dtype, times the float32 scale of each vocab row (per channel, axis 0) or of the
tensor, after the matmul; the softcap then acts on those dequantized logits, as on the model-dtype head's. NxD's
converter never swaps the head (`lm_head` is in modules_to_not_convert, and its type is not NxD's): the model builds
this class itself. A tied head's quantized copy comes from the quantized checkpoint (`lm_head.weight` and
`lm_head.scale`, quantize.py); the embedding table stays in the model dtype.
"""

from __future__ import annotations

import torch
from neuronx_distributed.parallel_layers import parallel_state
from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear
from neuronx_distributed.quantization.quantization_layers import QuantizedColumnParallel
from torch import nn

from .. import ops
from ..errors import ConfigError


class _SoftcapHead:
    """What both heads add to NxD's column-parallel linear: vocab padding at sharding, the cut and the softcap."""

    vocab_size: int
    softcap: float | None
    vocab_pad: int

    def _head_padding(self, vocab_size: int, gather_output: bool) -> int:
        """Rows added to the weight (ours when gathering; NxD's `pad=True` otherwise); refuses a vocabulary NxDI
        cannot mask on the last rank."""
        tp = parallel_state.get_tensor_model_parallel_size()
        pad = -vocab_size % tp
        if not gather_output and pad > -(-vocab_size // tp):  # NxDI masks pad columns on the last rank only
            raise ConfigError(f"vocab_size {vocab_size} is too small to shard over {tp} ranks with on-device "
                              "sampling; use a smaller tp_degree")
        return pad

    def _pad_rows(self, model_state_dict: dict, name: str, rows: int) -> None:
        tensor = model_state_dict[name]
        if tensor.shape[0] != self.vocab_size:
            raise ConfigError(f"{name} has {tensor.shape[0]} rows, expected the vocab_size {self.vocab_size}")
        model_state_dict[name] = nn.functional.pad(tensor, (0, 0, 0, rows))

    def forward(self, input_: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The final (normed) hidden states NxDI hands the head, kept for the fused assistant graph
        # (neuron/assistant.py), which feeds the target's hidden state to a Gemma 4 assistant. A reference only.
        self.hidden_in = input_
        logits = super().forward(input_, *args, **kwargs)
        if self.vocab_pad:
            logits = logits[..., : self.vocab_size]
        return ops.softcap(logits, self.softcap)


class SoftcapColumnParallelLinear(_SoftcapHead, ColumnParallelLinear):
    """The LM head in the model dtype (see the module docstring)."""

    def __init__(self, hidden_size: int, vocab_size: int, *, gather_output: bool, dtype: torch.dtype,
                 softcap: float | None):
        pad = self._head_padding(vocab_size, gather_output)
        if gather_output:
            ColumnParallelLinear.__init__(self, hidden_size, vocab_size + pad, bias=False, gather_output=True,
                                          dtype=dtype)
        else:
            ColumnParallelLinear.__init__(self, hidden_size, vocab_size, bias=False, gather_output=False, pad=True,
                                          dtype=dtype)
        self.vocab_size, self.softcap = vocab_size, softcap
        self.vocab_pad = pad if gather_output else 0  # sharded: NxD's pad_size holds it

    def preshard_hook(self, model_state_dict: dict, prefix: str) -> None:
        if not self.vocab_pad:
            super().preshard_hook(model_state_dict, prefix)
            return
        self._pad_rows(model_state_dict, prefix, self.vocab_pad)


class QuantizedSoftcapColumnParallel(_SoftcapHead, QuantizedColumnParallel):
    """The LM head with int8 / fp8 weights and float32 scales (see the module docstring). `q_config`: NxD's, as
    `quantized.q_config` builds it from the neuron config (the same scheme as the decoder layers')."""

    def __init__(self, hidden_size: int, vocab_size: int, *, gather_output: bool, dtype: torch.dtype,
                 softcap: float | None, q_config: dict):
        pad = self._head_padding(vocab_size, gather_output)
        QuantizedColumnParallel.__init__(
            self, hidden_size, vocab_size + (pad if gather_output else 0), bias=False,
            quantization_type=q_config["quantization_type"], gather_output=gather_output, dtype=dtype,
            quantized_dtype=q_config["quantized_dtype"], pad=not gather_output,
            quantization_per_channel_axis=0,  # one scale per vocab row: the matmul's output channel
            activation_quantization_type=q_config["activation_quantization_type"],
            clamp_bound=q_config["clamp_bound"],
        )
        self.vocab_size, self.softcap = vocab_size, softcap
        self.vocab_pad = pad if gather_output else 0  # sharded: NxD's pad_size holds it

    def preshard_hook(self, model_state_dict: dict, prefix: str) -> None:
        """Pad the weight and a per-channel scale to the padded vocab (either layout). NxD's own hook (pad=True)
        would also pad a per-tensor scale [1] as if it had rows, and fail."""
        rows = self.vocab_pad or (self.pad_size if self.pad else 0)
        if not rows:
            return
        self._pad_rows(model_state_dict, prefix, rows)
        scale = prefix[: -len("weight")] + "scale"
        if model_state_dict[scale].dim() == 2:  # per channel [vocab, 1]; per tensor [1] is not padded
            self._pad_rows(model_state_dict, scale, rows)
