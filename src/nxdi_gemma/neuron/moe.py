"""Gemma 4 routed experts on NxD's tensor-parallel layers. Untested on Trainium/Inferentia hardware."""

from __future__ import annotations

import contextlib

import torch
from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear
from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region
from neuronx_distributed.quantization.quantization_layers import QuantizedColumnParallel
from torch import nn

from .. import ops
from ..config import MoeSpec
from .quantized import no_weight_init


class ParallelMoeExperts(nn.Module):
    """Gemma 4 routed experts, tensor parallel, running only the experts each token was routed to.

    Weights: gate, up and the transposed down projection are each one [E*Ie, H] matrix, expert-major (HF's order,
    see `state_dict.experts_to_neuron`), held by a ColumnParallelLinear with stride E: NxD's sharding then cuts dim 0
    into E*TP chunks of Ie/TP rows and gives rank r the chunks r, r+TP, ..., i.e. the r-th slice of every expert's
    width, still expert-major: locally a [E, Ie/TP, H] stack from which one expert is one contiguous block. Each rank
    therefore computes a partial down projection of every routed (token, expert) pair; the partials meet in one
    all-reduce.

    The routed pairs are run in blocks that each belong to one expert, with that expert's weights gathered per
    block (static shapes; which expert and which rows are data, never Python control flow):
    - few pairs (n*k <= E, the token-generation graphs): one block per pair, in routing order, so a decode step reads
      only the k routed experts' weights of each token;
    - many pairs (context encoding): pairs grouped by expert into blocks of B rows (B ~ n*k/E), at most
      ceil(n*k/B) + E blocks, the unused ones fed a zero row and never read back. Compute ~2x the routed FLOPs
      instead of E/k x for running every expert on every token, but ~2E experts' weights gathered.
    Small context-encoding graphs (n <= 3 * Ie/TP) instead run every expert on every token (each weight read once,
    no gathered copies; the [n, E, H] outputs are then no larger than the rank's expert weights), and keep the k
    routed outputs of each token.

    Accumulation as HF 5.24 (`grouped_mm_experts_forward`, its default; eager differs only in summing expert by
    expert): each pair's down projection is rounded to the model dtype, multiplied by its float32 routing weight, the
    k products summed in float32 in routing order (slot 0 first), and the sum rounded once. With TP > 1 each rank
    rounds its partial projection before the float32 sum and the all-reduce runs in float32.

    Quantized weights (`quantized_dtype`, see neuron/quantized.py): the int8/fp8 stacks are cast to the activation
    dtype where they are gathered (exact), and each matmul's output is multiplied by its experts' per-channel scales
    in float32 (NxD's post-matmul dequantization), so no dequantized copy of a weight is formed."""

    def __init__(self, hidden: int, moe: MoeSpec, dtype: torch.dtype, quantized_dtype: torch.dtype | None = None):
        super().__init__()
        self.num_experts, self.hidden = moe.num_experts, hidden
        self.quantized = quantized_dtype is not None
        width = moe.num_experts * moe.intermediate_size

        def stack() -> nn.Module:
            if quantized_dtype is None:
                return ColumnParallelLinear(hidden, width, bias=False, gather_output=False, dtype=dtype,
                                            stride=moe.num_experts)
            # NxD's quantized layer holds the int8/fp8 stack and its per-row scale [E*Ie, 1], both sharded with
            # stride E like the float weight; only its parameters are used (the experts run their own matmuls).
            return QuantizedColumnParallel(hidden, width, bias=False, quantization_type="per_channel_symmetric",
                                           gather_output=False, dtype=dtype, quantized_dtype=quantized_dtype,
                                           stride=moe.num_experts, quantization_per_channel_axis=0)

        with no_weight_init() if quantized_dtype is not None else contextlib.nullcontext():
            self.gate_proj, self.up_proj, self.down_proj = stack(), stack(), stack()  # down_proj holds down^T
        if self.quantized:
            # down's output channels are the H columns of down^T: one scale per expert and column, whole on every
            # rank (no tensor-parallel attributes: NxD's sharding copies it).
            self.down_proj.scale = nn.Parameter(torch.ones(moe.num_experts, hidden), requires_grad=False)

    def _local(self, linear: nn.Module) -> torch.Tensor:
        """[E, Ie/TP, H] as stored (quantized weights are cast to the activations' dtype, exactly, only after the
        routed experts are gathered; their scale comes after the matmul)."""
        return linear.weight.view(self.num_experts, -1, self.hidden)

    def _row_scale(self, linear: nn.Module) -> torch.Tensor:
        return linear.scale.view(self.num_experts, -1)  # gate/up: [E, Ie/TP]; down: [E, H]

    def _scaled(self, out: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """NxD's post-matmul dequantization (scale_dequantize): float32 product, rounded to out's dtype."""
        return out if scale is None else (out.float() * scale).to(out.dtype)

    def _run_blocks(self, rows: torch.Tensor, block_expert: torch.Tensor) -> torch.Tensor:
        """rows [NB, B, H], block_expert int [NB] -> this rank's partial down projections [NB, B, H], model dtype."""
        dt = rows.dtype

        def scale(linear):  # [NB, 1, width]
            return self._row_scale(linear).index_select(0, block_expert)[:, None, :] if self.quantized else None

        gate = torch.bmm(rows, self._local(self.gate_proj).index_select(0, block_expert).to(dt).transpose(1, 2))
        up = torch.bmm(rows, self._local(self.up_proj).index_select(0, block_expert).to(dt).transpose(1, 2))
        act = ops.gelu_tanh(self._scaled(gate, scale(self.gate_proj))) * self._scaled(up, scale(self.up_proj))
        out = torch.bmm(act, self._local(self.down_proj).index_select(0, block_expert).to(dt))
        return self._scaled(out, scale(self.down_proj))

    def _per_pair(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """One block per (token, slot) pair: [n, k, H]."""
        n, k = experts.shape
        rows = x[:, None, :].expand(n, k, self.hidden).reshape(n * k, 1, self.hidden)
        return self._run_blocks(rows, experts.reshape(-1).to(torch.int32)).view(n, k, self.hidden)

    def _all_experts(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, then each token's k routed outputs: [n, k, H]."""
        n, k = experts.shape
        dt = x.dtype

        def scale(linear, shape):
            return self._row_scale(linear).reshape(shape) if self.quantized else None

        gate = nn.functional.linear(x, self.gate_proj.weight.to(dt))
        up = nn.functional.linear(x, self.up_proj.weight.to(dt))
        gate = self._scaled(gate, scale(self.gate_proj, (1, -1))).view(n, self.num_experts, -1)
        up = self._scaled(up, scale(self.up_proj, (1, -1))).view(n, self.num_experts, -1)
        out = torch.einsum("nei,eih->neh", ops.gelu_tanh(gate) * up, self._local(self.down_proj).to(dt))
        out = self._scaled(out, scale(self.down_proj, (1, self.num_experts, self.hidden)))
        pick = torch.arange(n, dtype=torch.int32, device=x.device)[:, None] * self.num_experts + experts.to(torch.int32)
        return out.reshape(n * self.num_experts, self.hidden).index_select(0, pick.reshape(-1)).view(n, k, self.hidden)

    def _grouped(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Pairs grouped by expert into blocks of `size` rows: [n, k, H]."""
        n, k = experts.shape
        pairs, num_experts = n * k, self.num_experts
        size = -(-pairs // num_experts)  # static: shapes only
        num_blocks = -(-pairs // size) + num_experts  # sum over experts of ceil(count / size) never exceeds this
        flat = experts.reshape(pairs).to(torch.int32)
        ids = torch.arange(num_experts, dtype=torch.int32, device=x.device)
        onehot = (flat[:, None] == ids[None, :]).to(torch.int32)  # [pairs, E]
        counts = onehot.sum(0, dtype=torch.int32)
        blocks = (counts + (size - 1)) // size
        first_block = torch.cumsum(blocks, 0, dtype=torch.int32) - blocks
        # rank of each pair among the earlier pairs routed to the same expert (pairs keep token order in a block)
        rank = ((torch.cumsum(onehot, 0, dtype=torch.int32) - onehot) * onehot).sum(1, dtype=torch.int32)
        row = first_block.index_select(0, flat) * size + rank  # where each pair sits in the [num_blocks*size] layout
        pair_ids = torch.arange(pairs, dtype=torch.int32, device=x.device)
        token_of_row = torch.full((num_blocks * size,), n, dtype=torch.int32, device=x.device)
        token_of_row = token_of_row.index_put((row,), pair_ids // k)  # unused rows read token n, a zero row
        block_ids = torch.arange(num_blocks, dtype=torch.int32, device=x.device)
        block_expert = ((first_block + blocks)[None, :] <= block_ids[:, None]).sum(1, dtype=torch.int32)
        block_expert = block_expert.clamp(max=num_experts - 1)  # blocks past the last expert's: unused
        padded = torch.cat([x, torch.zeros_like(x[:1])], dim=0)
        rows = padded.index_select(0, token_of_row).view(num_blocks, size, self.hidden)
        out = self._run_blocks(rows, block_expert).reshape(num_blocks * size, self.hidden)
        return out.index_select(0, row).view(n, k, self.hidden)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [n, H]; weights float32 [n, k]; experts [n, k] -> [n, H] in x's dtype."""
        n, k = experts.shape
        # Python decision on the graph's static shapes (never on values): per-pair reads at most every weight once
        # while the pairs are no more than the experts (decode); see the class docstring for the other two.
        if n * k <= self.num_experts:
            y = self._per_pair(x, experts)
        elif n <= 3 * self.gate_proj.weight.shape[0] // self.num_experts:
            y = self._all_experts(x, experts)
        else:
            y = self._grouped(x, experts)
        acc = y[:, 0].float() * weights[:, 0, None]
        for slot in range(1, k):  # float32, slot order: torch's sum over the k axis, as HF
            acc = acc + y[:, slot].float() * weights[:, slot, None]
        return reduce_from_tensor_model_parallel_region(acc).to(x.dtype)
