"""Gemma modules shared by the CPU runtime and the NxDI classes.

Parameter names equal the Hugging Face names below `model.` (so checkpoint conversion is prefix handling only).
Linear layers are built through a `LinearFactory`, so the NxDI classes pass ColumnParallelLinear/RowParallelLinear
and reuse these modules unchanged; attention (projections, cache, kernels) is the one piece each runtime supplies,
and `GemmaBlock` wires everything around it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from . import ops
from .config import GemmaPlan, LayerPlan, MoeSpec


class LinearFactory(Protocol):
    def __call__(self, in_features: int, out_features: int, parallel: str) -> nn.Module:
        """parallel: "column" (output split across ranks) or "row" (input split, output reduced)."""


def plain_linear(in_features: int, out_features: int, parallel: str) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: (1 + w) for Gemma 2/3, w for Gemma 4, or weightless (with_weight=False)."""

    def __init__(self, dim: int, eps: float, add_one: bool, with_weight: bool = True):
        super().__init__()
        self.eps, self.add_one = eps, add_one
        self.weight = nn.Parameter(torch.zeros(dim) if add_one else torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.add_one)


def make_norm(plan: GemmaPlan, dim: int, with_weight: bool = True, folded: bool = False) -> RMSNorm:
    """A norm of this generation. folded: the weights already hold Gemma 2/3's `1 + w` (Neuron checkpoints), so
    every norm is `rms(x) * w`."""
    return RMSNorm(dim, plan.rms_norm_eps, plan.norm_adds_one and not folded, with_weight)


class GemmaMLP(nn.Module):
    """GeGLU with tanh GELU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, linear: LinearFactory = plain_linear):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate, "column")
        self.up_proj = linear(hidden, intermediate, "column")
        self.down_proj = linear(intermediate, hidden, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class MoeRouter(nn.Module):
    """Gemma 4 router: reads the un-normed residual through a weightless RMS, a learned scale and H^-0.5."""

    def __init__(self, plan: GemmaPlan, moe: MoeSpec):
        super().__init__()
        self.top_k, self.inv_sqrt_hidden = moe.top_k, plan.hidden_size**-0.5
        self.norm = make_norm(plan, plan.hidden_size, with_weight=False)
        self.proj = nn.Linear(plan.hidden_size, moe.num_experts, bias=False)  # tiny; replicated on every rank
        self.scale = nn.Parameter(torch.ones(plan.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(moe.num_experts))

    def forward(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(residual) * self.scale * self.inv_sqrt_hidden  # two roundings in bf16, as HF
        return ops.moe_routing(self.proj(z), self.top_k, self.per_expert_scale)


class MoeExperts(nn.Module):
    """Stacked expert weights as HF stores them: gate_up_proj [E, 2*Ie, H] (gate first), down_proj [E, H, Ie]."""

    def __init__(self, hidden: int, moe: MoeSpec):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(moe.num_experts, 2 * moe.intermediate_size, hidden))
        self.down_proj = nn.Parameter(torch.empty(moe.num_experts, hidden, moe.intermediate_size))

    def expert(self, e: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return nn.functional.linear(ops.gelu_tanh(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights float32 [N, k]; experts [N, k] -> [N, H] in x's dtype.

        As HF 5.24's default experts path (`grouped_mm_experts_forward`): each (token, slot) output rounded to x's
        dtype, times its float32 weight, the k products summed in float32 over the slot axis, rounded once. Runs
        only the experts that received tokens (eager, data-dependent: CPU only).
        """
        pairs = torch.empty(*experts.shape, x.shape[-1], dtype=x.dtype, device=x.device)
        for e in torch.unique(experts).tolist():
            token, slot = torch.nonzero(experts == e, as_tuple=True)
            pairs[token, slot] = self.expert(e, x[token])
        return (pairs.float() * weights[..., None]).sum(dim=1).to(x.dtype)


class GemmaBlock(nn.Module):
    """One decoder layer minus the attention internals (spec 3.2, 4.4, 5.8).

    A runtime builds its attention module and hands it in as `self_attn`; its forward calls
    `attention_input(h)`, runs attention on that, and finishes with `after_attention(h, attn_out, ple)`.
    """

    def __init__(self, plan: GemmaPlan, layer: LayerPlan, self_attn: nn.Module, linear: LinearFactory = plain_linear,
                 folded_norms: bool = False, experts: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        hidden = plan.hidden_size
        self.self_attn = self_attn
        self.input_layernorm = make_norm(plan, hidden, folded=folded_norms)
        self.post_attention_layernorm = make_norm(plan, hidden, folded=folded_norms)
        self.pre_feedforward_layernorm = make_norm(plan, hidden, folded=folded_norms)
        self.post_feedforward_layernorm = make_norm(plan, hidden, folded=folded_norms)
        # a runtime may supply its own GemmaMLP subclass (the NxDI classes pass LoRA adapter ids to its linears)
        self.mlp = mlp if mlp is not None else GemmaMLP(hidden, layer.intermediate_size, linear)
        self.moe = layer.moe is not None
        if self.moe:
            self.router = MoeRouter(plan, layer.moe)
            self.experts = experts if experts is not None else MoeExperts(hidden, layer.moe)
            self.pre_feedforward_layernorm_2 = make_norm(plan, hidden)
            self.post_feedforward_layernorm_1 = make_norm(plan, hidden)
            self.post_feedforward_layernorm_2 = make_norm(plan, hidden)
        self.ple = plan.ple_dim > 0
        if self.ple:
            # P (256) is small: these stay whole on every rank, next to the whole PLE slice they combine with.
            self.per_layer_input_gate = nn.Linear(hidden, plan.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(plan.ple_dim, hidden, bias=False)
            self.post_per_layer_input_norm = make_norm(plan, hidden)
        self.layer_scalar = nn.Parameter(torch.ones(1)) if plan.has_layer_scalar else None

    def attention_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.input_layernorm(h)

    def after_attention(
        self, h: torch.Tensor, attn_out: torch.Tensor, per_layer_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = h + self.post_attention_layernorm(attn_out)
        residual = h
        m = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            flat = residual.reshape(-1, residual.shape[-1])
            weights, experts = self.router(flat)
            routed = self.experts(self.pre_feedforward_layernorm_2(flat), weights, experts).reshape(residual.shape)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(routed)
        h = residual + self.post_feedforward_layernorm(m)
        if self.ple:
            g = ops.gelu_tanh(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h


def per_layer_inputs(
    plan: GemmaPlan,
    ids: torch.Tensor,
    h0: torch.Tensor,
    table: nn.Module,
    projection: nn.Module,
    projection_norm: nn.Module,
) -> torch.Tensor:
    """Gemma 4 PLE (spec 5.7): [B, S, L, P] from the token ids and the scaled main embedding h0, computed once
    per forward and sliced per layer. `table` is the [V_ple, L*P] embedding, `projection` the H -> L*P linear."""
    lp = (plan.num_layers, plan.ple_dim)
    token_part = table(ids) * ops.embed_scale(plan.ple_dim, h0.dtype)
    token_part = token_part.reshape(*ids.shape, *lp)
    context = projection(h0) * plan.hidden_size**-0.5
    context = projection_norm(context.reshape(*h0.shape[:-1], *lp))
    return (context + token_part) * 2.0**-0.5


def attention_norms(
    plan: GemmaPlan, layer: LayerPlan, folded: bool = False
) -> tuple[RMSNorm | None, RMSNorm | None, RMSNorm | None]:
    """(q_norm, k_norm, v_norm) of a layer: Gemma 3/4 per-head q/k norms (weight [D] shared by heads) and Gemma 4's
    weightless v norm, all applied over the head dim before RoPE. KV-shared layers have no k/v norm."""
    has_kv = not layer.shares_kv
    q_norm = make_norm(plan, layer.head_dim, folded=folded) if plan.has_qk_norm else None
    k_norm = make_norm(plan, layer.head_dim, folded=folded) if plan.has_qk_norm and has_kv else None
    v_norm = make_norm(plan, layer.head_dim, with_weight=False) if plan.has_v_norm and has_kv else None
    return q_norm, k_norm, v_norm


class AttentionWeights(nn.Module):
    """The parameters of one attention layer under HF's names: q/k/v/o projections (no k/v on KV-shared layers, no v
    where K=V) and the q/k/v norms. The CPU runtime's attention extends it; the checkpoint's expected shapes use it."""

    def __init__(self, plan: GemmaPlan, layer: LayerPlan):
        super().__init__()
        hidden, heads, kv, dim = plan.hidden_size, layer.num_heads, layer.num_kv_heads, layer.head_dim
        self.q_proj = nn.Linear(hidden, heads * dim, bias=False)
        if not layer.shares_kv:
            self.k_proj = nn.Linear(hidden, kv * dim, bias=False)
            if not layer.k_eq_v:
                self.v_proj = nn.Linear(hidden, kv * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=False)
        self.q_norm, self.k_norm, self.v_norm = attention_norms(plan, layer)
