"""Multi-LoRA on NxDI's LoRA serving (modules/lora_serving) in NxDI's CPU mode: two random PEFT adapters (ranks 4
and 8, on q/k/v/o and gate/up/down) and the base model in one batch; each row's greedy tokens equal HF with that
adapter merged by PEFT (the base row: plain HF), logits within the golden's float32 bound. lora_driver.py runs it;
make_goldens.py makes the adapters and the PEFT goldens in the main environment (peft, the `test` extra)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import SIM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"a4": {"rank": 4, "seed": 11, "targets": TARGETS}, "a8": {"rank": 8, "seed": 12, "targets": TARGETS}}


def _config(kind: str) -> dict:
    from nxdi_gemma.tiny import TINY_CONFIGS

    if kind == "gemma4_dense":  # PLE, KV sharing, K=V, no MoE (see the module docstring)
        return {**TINY_CONFIGS["gemma4"], "enable_moe_block": False, "num_experts": None, "top_k_experts": None,
                "moe_intermediate_size": None}
    return TINY_CONFIGS[kind]


def _adapters(kind: str) -> dict:
    """On the Gemma 4 MoE fixture, attention adapters only: NxDI's suffix match would also wrap the stacked expert
    linears (experts.gate_proj/up_proj/down_proj), so the serving check drops MLP adapters there."""
    if kind == "gemma4":
        return {name: {**adapter, "targets": TARGETS[:4]} for name, adapter in ADAPTERS.items()}
    return ADAPTERS


def _spec(kind: str) -> dict:
    return {f"lora_{kind}": {"config": _config(kind), "seed": 0, "prompt_lengths": [5, 19], "prompt_seed": 31,
                             "new_tokens": 8, "adapters": _adapters(kind)}}


# Gemma 4 MoE (K=V, PLE, KV sharing, MoE) with attention-only adapters: measured at 0.5 token match with a4 (prompt
# 0 diverges at token 4; through vLLM the zero "base" adapter diverges too): LoRA changes the MoE model's output; the
# serving check refuses --enable-lora on MoE checkpoints until this passes.
MOE_NOT_EXACT = pytest.mark.xfail(strict=True, reason="LoRA on the Gemma 4 MoE model differs from HF+PEFT (measured)")


@pytest.mark.parametrize("release", ["sdk-2.28", pytest.param("sdk-2.29", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["gemma3", pytest.param("gemma4_dense", marks=pytest.mark.slow),
                                  pytest.param("gemma4", marks=[pytest.mark.slow, MOE_NOT_EXACT])])
def test_lora_adapters_and_base_in_one_batch_match_peft(sim, tmp_path, release, kind):
    sim.need(release)
    (case,) = sim.goldens(_spec(kind)).values()
    out = tmp_path / "records.json"
    sim.run([sys.executable, str(SIM / "lora_driver.py"), "--out", str(out), str(case)], release)
    records = json.loads(out.read_text())
    golden = json.loads((case / "golden.json").read_text())
    assert {r["adapter"] for r in records} == {None, *ADAPTERS}
    for name in ADAPTERS:  # each adapter changes HF's tokens: the comparison can tell adapters apart
        assert golden["adapters"][name]["tokens"] != golden["tokens"]
    for r in records:
        assert r["standins_called"] == []
        assert r["match"] == 1.0, f"prompt {r['prompt']} adapter {r['adapter']}: {r['tokens']} vs {r['golden_tokens']}"
        assert r["max_abs_logit_diff"] <= golden["bound"], (r["prompt"], r["adapter"], r["max_abs_logit_diff"])
