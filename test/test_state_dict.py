"""nxdi_gemma.neuron.state_dict: HF Gemma weights -> the names and layout of our NxDI modules (CPU, no NxDI).

Checked on the tiny fixture plans (Gemma 2 / 3 / 4) and on public geometries cut to a few layers, with random
tensors shaped by `checkpoint.expected_shapes(plan)`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from nxdi_gemma.benchmark import shrunk_config
from nxdi_gemma.checkpoint import expected_shapes
from nxdi_gemma.config import FULL, plan_from_config
from nxdi_gemma.neuron.state_dict import convert_hf_to_neuron_state_dict, neuron_name
from nxdi_gemma.public_models import public_config
from nxdi_gemma.tiny import TINY_CONFIGS

NORM = re.compile(r"norm(_\d)?\.weight$")  # every RMSNorm weight: layer norms, q/k norms, final norm, PLE norms
QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
TINY = sorted(TINY_CONFIGS)


def random_state(plan, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random values for every tensor a checkpoint of `plan` holds (norms around 0 or 1 do not matter:
    the conversion must treat every value the same)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in sorted(expected_shapes(plan).items())}


def tiny(kind: str, **overrides):
    return plan_from_config(dict(TINY_CONFIGS[kind], **overrides), source=f"tiny {kind}")


def convert(state, plan, tp=2, fused=False, fold=False):
    return convert_hf_to_neuron_state_dict(dict(state), plan, tp, fused, fold_norm_offset=fold)


def attn(index: int) -> str:
    return f"layers.{index}.self_attn."


# ------------------------------------------------------------------------------------------------------------------
# Checks shared by the tiny and the public-geometry cases.


def check_names(state, out):
    assert not [k for k in out if k.startswith("model.")], "the 'model.' prefix must be stripped"
    assert not [k for k in out if ".q_norm." in k or ".k_norm." in k], "q_norm/k_norm must become q/k_layernorm"
    for name in state:
        target = neuron_name(name)
        assert not target.startswith("model."), name
        if name.endswith("self_attn.q_norm.weight"):
            assert target == name.removeprefix("model.").replace("q_norm", "q_layernorm")
            assert target in out
        if name.endswith("self_attn.k_norm.weight"):
            assert target == name.removeprefix("model.").replace("k_norm", "k_layernorm")
            assert target in out


def check_shapes(state, out):
    """Unfused: every tensor except the stacked MoE experts keeps its shape under its new name."""
    for name, tensor in state.items():
        if ".experts." in name:
            continue
        target = neuron_name(name)
        assert target in out, f"{name} -> {target} missing"
        assert out[target].shape == tensor.shape, name


def check_norms(plan, state, out, folded=False):
    norms = [name for name in state if NORM.search(name)]
    assert "model.norm.weight" in norms
    for name in norms:
        got = out[neuron_name(name)]
        if folded and plan.norm_adds_one:
            # Gemma 2/3 scale by (1 + w): folded once, in float32, and kept in float32.
            expected = 1.0 + state[name].float()
            assert got.dtype == torch.float32, name
            assert torch.equal(got, expected), name
        else:
            assert torch.equal(got, state[name]), f"norm {name} must not be folded"
            assert got.dtype == state[name].dtype, name


def check_untouched(state, out):
    """Non-norm tensors that keep their name keep their exact values."""
    for name, tensor in state.items():
        if NORM.search(name) or ".experts." in name or name.endswith(QKV):
            continue
        assert torch.equal(out[neuron_name(name)], tensor), name


def check_fused(plan, state, out):
    for layer in plan.layers:
        if layer.shares_kv:
            continue  # no K/V of its own in the checkpoint
        prefix = attn(layer.index)
        src = "model." + prefix
        q, k = state[src + "q_proj.weight"], state[src + "k_proj.weight"]
        v = k if layer.k_eq_v else state[src + "v_proj.weight"]
        assert torch.equal(out[prefix + "Wqkv.weight"], torch.cat([q, k, v], dim=0)), layer.index
        for proj in QKV:
            assert prefix + proj not in out, f"{prefix + proj} must be removed when fused"


def check_ranks(plan, out, tp):
    expected = torch.arange(tp, dtype=torch.int32)
    assert out["rank_util.rank"].dtype == torch.int32
    assert torch.equal(out["rank_util.rank"], expected)
    for layer in plan.layers:
        rank = out[attn(layer.index) + "rank_util.rank"]
        assert rank.dtype == torch.int32 and torch.equal(rank, expected), layer.index


def check_tied_head(plan, out):
    assert plan.tie_word_embeddings
    head, table = out["lm_head.weight"], out["embed_tokens.weight"]
    assert torch.equal(head, table)
    assert head.untyped_storage().data_ptr() != table.untyped_storage().data_ptr(), "lm_head must be its own copy"


# ------------------------------------------------------------------------------------------------------------------
# Tiny fixture plans.


@pytest.mark.parametrize("kind", TINY)
def test_names(kind):
    plan = tiny(kind)
    state = random_state(plan)
    check_names(state, convert(state, plan))
    check_names(state, convert(state, plan, fused=True))


def test_neuron_name_examples():
    assert neuron_name("model.layers.3.self_attn.q_norm.weight") == "layers.3.self_attn.q_layernorm.weight"
    assert neuron_name("model.layers.3.self_attn.k_norm.weight") == "layers.3.self_attn.k_layernorm.weight"
    assert neuron_name("model.layers.0.self_attn.q_proj.weight") == "layers.0.self_attn.q_proj.weight"
    assert neuron_name("model.layers.7.input_layernorm.weight") == "layers.7.input_layernorm.weight"
    assert neuron_name("model.norm.weight") == "norm.weight"
    assert neuron_name("model.embed_tokens.weight") == "embed_tokens.weight"
    assert neuron_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("kind", TINY)
def test_shapes_preserved(kind):
    plan = tiny(kind)
    state = random_state(plan)
    check_shapes(state, convert(state, plan))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_fold_plus_one_gemma2_3(kind, dtype):
    plan = tiny(kind)
    assert plan.norm_adds_one
    state = random_state(plan, dtype)
    out = convert(state, plan, fold=True)
    check_norms(plan, state, out, folded=True)
    check_untouched(state, out)
    folded = {neuron_name(n) for n in state if NORM.search(n)}
    assert "norm.weight" in folded
    if plan.has_qk_norm:
        assert {f"{attn(i)}q_layernorm.weight" for i in range(plan.num_layers)} <= folded
        assert {f"{attn(i)}k_layernorm.weight" for i in range(plan.num_layers)} <= folded


def test_fold_keeps_float32_precision_of_bf16_weights():
    plan = tiny("gemma3")
    state = random_state(plan, torch.bfloat16)
    out = convert(state, plan, fold=True)
    w = state["model.norm.weight"]
    # 1 + w rounded back to bf16 loses w's low bits; the conversion must keep the float32 sum.
    assert not torch.equal((1.0 + w).float(), 1.0 + w.float())
    assert torch.equal(out["norm.weight"], 1.0 + w.float())


def test_norms_not_folded_gemma4():
    plan = tiny("gemma4")
    assert not plan.norm_adds_one
    for dtype in (torch.float32, torch.bfloat16):
        state = random_state(plan, dtype)
        for fold in (False, True):  # Gemma 4 norms scale by w: nothing to fold either way
            out = convert(state, plan, fold=fold)
            check_norms(plan, state, out, folded=fold)
            check_untouched(state, out)


@pytest.mark.parametrize("kind", TINY)
def test_fused_qkv_layout(kind):
    plan = tiny(kind)
    state = random_state(plan)
    check_fused(plan, state, convert(state, plan, fused=True))


@pytest.mark.parametrize("kind", TINY)
def test_unfused_keeps_separate_projections(kind):
    plan = tiny(kind)
    state = random_state(plan)
    out = convert(state, plan, fused=False)
    assert not [k for k in out if k.endswith("Wqkv.weight")]
    for layer in plan.layers:
        if layer.shares_kv:
            continue
        for proj in QKV:
            assert attn(layer.index) + proj in out


@pytest.mark.parametrize("kind", TINY)
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_rank_tensors(kind, tp):
    plan = tiny(kind)
    state = random_state(plan)
    for fused in (False, True):
        check_ranks(plan, convert(state, plan, tp=tp, fused=fused), tp)


@pytest.mark.parametrize("kind", TINY)
def test_tied_lm_head_is_a_separate_copy(kind):
    plan = tiny(kind)
    state = random_state(plan)
    assert "lm_head.weight" not in state  # tied checkpoints do not store it
    out = convert(state, plan)
    check_tied_head(plan, out)
    out["lm_head.weight"].add_(1.0)  # writing one must not change the other
    assert torch.equal(out["embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_untied_lm_head_is_kept():
    plan = tiny("gemma2", tie_word_embeddings=False)
    state = random_state(plan)
    assert "lm_head.weight" in state
    out = convert(state, plan)
    assert torch.equal(out["lm_head.weight"], state["lm_head.weight"])
    assert not torch.equal(out["lm_head.weight"], out["embed_tokens.weight"])


def test_k_eq_v_layers_get_k_as_v():
    plan = tiny("gemma4")
    full = [layer for layer in plan.layers if layer.attention_type == FULL]
    assert full and all(layer.k_eq_v for layer in full)
    assert any(not layer.shares_kv for layer in full)
    state = random_state(plan)
    for layer in full:
        if not layer.shares_kv:
            assert f"model.{attn(layer.index)}v_proj.weight" not in state  # K=V checkpoints store no v_proj
    out = convert(state, plan)
    for layer in full:
        prefix = attn(layer.index)
        assert torch.equal(out[prefix + "v_proj.weight"], out[prefix + "k_proj.weight"]), layer.index
        if not layer.shares_kv:
            assert torch.equal(out[prefix + "v_proj.weight"], state[f"model.{prefix}k_proj.weight"])
    for layer in plan.layers:
        if layer.attention_type != FULL and not layer.shares_kv:
            prefix = attn(layer.index)
            assert torch.equal(out[prefix + "v_proj.weight"], state[f"model.{prefix}v_proj.weight"]), layer.index


def test_imports_no_nxdi_module():
    # A fresh interpreter where any neuronx_distributed* import is refused and recorded, so that the test means the
    # same with and without NxDI installed (and catches imports wrapped in try/except).
    code = textwrap.dedent(
        """
        import sys

        attempts = []

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0].startswith("neuronx_distributed"):
                    attempts.append(name)
                    raise ImportError(f"refused {name}")
                return None

        sys.meta_path.insert(0, Refuse())
        import nxdi_gemma.neuron.state_dict  # noqa: F401
        loaded = sorted(m for m in sys.modules if m.startswith("neuronx_distributed"))
        print("attempts", attempts, "loaded", loaded)
        sys.exit(1 if attempts or loaded else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------------------------
# Public geometries cut to a few layers (real head dims, widths and config forms; bf16 like a real checkpoint).

PUBLIC = [
    ("gemma-2-2b", 1),  # Gemma 2: softcaps, head_dim 256
    ("gemma-3-4b", 1),  # multimodal config (text_config), q/k norms
    ("gemma-4-e2b", 5),  # layer 4 is a full layer with head_dim 512; PLE
]


@pytest.mark.parametrize("name,layers", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_geometry(name, layers):
    plan = plan_from_config(shrunk_config(public_config(name), layers, 512), source=name)
    assert plan.num_layers == layers
    state = random_state(plan, torch.bfloat16)
    tp = 4
    out = convert(state, plan, tp=tp)
    check_names(state, out)
    check_shapes(state, out)
    check_norms(plan, state, out)
    check_untouched(state, out)
    check_ranks(plan, out, tp)
    check_tied_head(plan, out)
    check_norms(plan, state, convert(state, plan, tp=tp, fold=True), folded=True)
    del out
    fused = convert(state, plan, tp=tp, fused=True)
    check_names(state, fused)
    check_fused(plan, state, fused)
    check_ranks(plan, fused, tp)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_unfolded_norms_stay_offsets(kind):
    # The default (fold_norm_offset=False): the NxDI norms add 1 in float32 at run time, as HF does.
    plan = tiny(kind)
    state = random_state(plan, torch.bfloat16)
    out = convert_hf_to_neuron_state_dict(state, plan, tp_degree=1)
    for name, tensor in state.items():
        if NORM.search(name):
            assert torch.equal(out[neuron_name(name)], tensor), name


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_experts_shard_to_every_expert_slice_in_expert_order(tp):
    """The experts' conversion as `moe.ParallelMoeExperts` reads it: split dim 0 the way NxD shards a parameter of
    partition stride E (E*TP chunks of Ie/TP rows; rank r takes chunks r, r+TP, ...) and view it [E, Ie/TP, H]:
    rank r's block e is rows r*Ie/TP.. of expert e's gate, up and transposed down, as HF stores them."""
    from nxdi_gemma.neuron.state_dict import experts_to_neuron

    num_experts, ie, hidden = 6, 8, 5
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(num_experts, 2 * ie, hidden, generator=gen)
    down = torch.randn(num_experts, hidden, ie, generator=gen)
    out = experts_to_neuron(gate_up, down)
    width = ie // tp
    expected = {"gate_proj.weight": gate_up[:, :ie], "up_proj.weight": gate_up[:, ie:],
                "down_proj.weight": down.transpose(1, 2)}
    for name, hf in expected.items():
        assert out[name].shape == (num_experts * ie, hidden)
        chunks = torch.split(out[name], width, dim=0)
        for rank in range(tp):
            local = torch.cat(chunks[rank::tp], dim=0).view(num_experts, width, hidden)
            assert torch.equal(local, hf[:, rank * width:(rank + 1) * width]), (name, rank)
