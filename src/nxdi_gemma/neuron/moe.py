"""Gemma 4 routed experts on NxD's tensor-parallel linears. Untested on Trainium/Inferentia hardware."""

from __future__ import annotations

import torch
from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear, RowParallelLinear
from torch import nn

from .. import ops
from ..config import MoeSpec


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


