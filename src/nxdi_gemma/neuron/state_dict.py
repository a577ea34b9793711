"""HF Gemma weights (our names = HF *ForCausalLM names) -> the names and layout of our NxDI modules.

No NxDI import: this runs and is tested on any machine. Gemma 2/3 norm weights stay HF's offsets by default and
the NxDI norms add 1 in float32 at run time, as HF does. `fold_norm_offset=True` (the neuron config's field) folds
`1 + w` in here instead (computed in float32), so every norm is `rms(x) * w`, what a fused norm kernel would read; in
a bfloat16 build that rounds `1 + w` to bf16 where HF adds in float32 (Gemma 3 fixture: 3.7e-2 max logit diff),
and no kernel reads it while every NKI kernel is off.
"""

from __future__ import annotations

import torch

from ..config import GemmaPlan

_NORM_SUFFIXES = (
    "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "pre_feedforward_layernorm_2.weight", "post_feedforward_layernorm_1.weight",
    "post_feedforward_layernorm_2.weight", "post_per_layer_input_norm.weight", "per_layer_projection_norm.weight",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
)


# Gemma 4 PLE tensors live in the embedding module on Neuron: it computes the per-layer inputs from the token ids.
_PLE_NAMES = ("embed_tokens_per_layer.weight", "per_layer_model_projection.weight", "per_layer_projection_norm.weight")


def neuron_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_norm.weight` -> `layers.3.self_attn.q_layernorm.weight` (NxDI attention applies
    `q_layernorm`/`k_layernorm` per head before RoPE); PLE tables move under `embed_tokens.`."""
    name = hf_name.removeprefix("model.")
    if name in _PLE_NAMES:
        return "embed_tokens." + name
    return name.replace("self_attn.q_norm.", "self_attn.q_layernorm.").replace("self_attn.k_norm.", "self_attn.k_layernorm.")


def experts_to_neuron(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF stacked experts -> gate, up and transposed down, each [E*Ie, H] expert-major (row e*Ie + i), as
    `moe.ParallelMoeExperts` holds them: NxD's strided sharding (stride E) gives each rank the same slice of every
    expert's width, in expert order, so one expert's weights are one contiguous block per rank."""
    num_experts, two_ie, hidden = gate_up.shape
    ie = two_ie // 2
    return {
        "gate_proj.weight": gate_up[:, :ie].reshape(num_experts * ie, hidden),
        "up_proj.weight": gate_up[:, ie:].reshape(num_experts * ie, hidden),
        "down_proj.weight": down.transpose(1, 2).reshape(num_experts * ie, hidden),
    }


def expert_scales_to_neuron(gate_up: torch.Tensor, down: torch.Tensor, ie: int, hidden: int) -> dict[str, torch.Tensor]:
    """Scales of quantized experts (`nxdi_gemma.quantize`: gate_up [E, 2*Ie, 1], down [E, H, 1] per channel, or
    [E, 1, 1] per expert) -> per-row scales [E*Ie, 1] of the gate and up stacks (sharded like their rows) and the
    [E, H] scale of down (its output channels are the columns of the transposed stack), as
    `moe.ParallelMoeExperts` holds them."""
    num_experts = gate_up.shape[0]
    gate_up = gate_up.expand(num_experts, 2 * ie, 1)
    return {
        "gate_proj.scale": gate_up[:, :ie].reshape(num_experts * ie, 1).contiguous(),
        "up_proj.scale": gate_up[:, ie:].reshape(num_experts * ie, 1).contiguous(),
        "down_proj.scale": down.expand(num_experts, hidden, 1)[:, :, 0].contiguous(),
    }


def is_norm_weight(hf_name: str) -> bool:
    return hf_name == "model.norm.weight" or hf_name.endswith(_NORM_SUFFIXES)


def convert_hf_to_neuron_state_dict(
    state: dict[str, torch.Tensor], plan: GemmaPlan, tp_degree: int, fused_qkv: bool = False,
    fold_norm_offset: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename, fold norm offsets if asked, fuse QKV if asked, materialise the tied LM head and K=V values, add rank
    tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if fold_norm_offset and plan.norm_adds_one and is_norm_weight(name):
            tensor = 1.0 + tensor.float()
        out[neuron_name(name)] = tensor
    for layer in plan.layers:
        if layer.moe is not None:
            experts = f"layers.{layer.index}.experts."
            gate_up, down = out.pop(experts + "gate_up_proj"), out.pop(experts + "down_proj")
            converted = experts_to_neuron(gate_up, down)
            if experts + "gate_up_proj_scale" in out:  # quantized checkpoint (nxdi_gemma.quantize)
                converted.update(expert_scales_to_neuron(out.pop(experts + "gate_up_proj_scale"),
                                                         out.pop(experts + "down_proj_scale"), down.shape[2],
                                                         down.shape[1]))
            out.update({experts + name: tensor for name, tensor in converted.items()})
        prefix = f"layers.{layer.index}.self_attn."
        quantized = prefix + "q_proj.scale" in out  # attention weights quantized (nxdi_gemma.quantize)
        if layer.shares_kv:
            # KV-shared layers attend to their source's K/V; NxDI's projection module still has K/V weights, which
            # compute a value nobody reads. Zeros keep the load complete (checkpoints do not store them).
            q = out[prefix + "q_proj.weight"]
            kv_shape = (layer.num_kv_heads * layer.head_dim, q.shape[1])
            for name in ("k_proj", "v_proj"):
                out[prefix + name + ".weight"] = torch.zeros(kv_shape, dtype=q.dtype)
                if quantized:
                    scale = out[prefix + "q_proj.scale"]
                    out[prefix + name + ".scale"] = torch.ones(kv_shape[0] if scale.dim() == 2 else 1,
                                                               *scale.shape[1:], dtype=scale.dtype)
        if layer.k_eq_v:
            # V is the raw K projection (before k_norm and RoPE): give the V projection the K weights.
            out[prefix + "v_proj.weight"] = out[prefix + "k_proj.weight"]
            if quantized:
                out[prefix + "v_proj.scale"] = out[prefix + "k_proj.scale"]
        if fused_qkv:
            for suffix in (".weight", ".scale") if quantized else (".weight",):
                out[prefix + "Wqkv" + suffix] = torch.cat(
                    [out.pop(prefix + name + suffix) for name in ("q_proj", "k_proj", "v_proj")]
                )
        out[prefix + "rank_util.rank"] = torch.arange(tp_degree, dtype=torch.int32)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"].clone()  # tied: NxDI shards its own copy
    out["rank_util.rank"] = torch.arange(tp_degree, dtype=torch.int32)
    return out
