"""Gemma 4 assistant drafters in NxDI fused speculation (neuron/assistant.py: the assistant reads the target's KV cache
in place, the target verifies K + 1 in the same graph), NxDI CPU mode, TP 1 and 2, NxDI 0.8 and 0.9.

The pair (make_goldens.py `assistant_golden`): a miniature random assistant built and saved by transformers'
Gemma4AssistantForCausalLM (window 6, 2 layers, half the target's query heads, centroid-sparse head with a random
token ordering) for a Gemma 4 target of the tier (window 8; prompts of 30, 5, 19 and 12 tokens, 24 new: past both
windows, four rows of a continuously batched step at different positions). Per case:
- the output equals the target's HF greedy golden on every row;
- every row's proposals at every step equal the CPU runtime assistant's (`nxdi_gemma.assistant.AssistantDraft`, whose
  proposals test/test_assistant.py checks equal to HF's `generate(assistant_model=...)` step by step) on the same
  prompt; the CPU run goes K + 1 tokens further so that its steps propose K, as the fused graph always does;
- the acceptance rate is reported next to HF's own assisted generation on the same pair (HF's last steps propose
  fewer than K), and HF's assisted output is checked to be the golden too.
CI runs gemma4_ple (PLE + KV sharing: the assistant reads the last unshared layers) at K = 4, TP 1 on both releases
and TP 2 on NxDI 0.8; the other K, the K=V + MoE target and 0.9's TP 2 are slow. One driver process per release, TP
degree and selection runs its cases.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import RELEASES, SIM, family_specs
from test_speculation_nxdi import run_spec_driver

PROMPTS = [30, 5, 19, 12]
# (tp, target, K) per selection. TP 2 (gloo, two processes): the target's KV heads split over the ranks (gemma4_ple)
# and its one global KV head replicated to both (gemma4_moe).
CI_CASES = {1: [("gemma4_ple", 4)], 2: [("gemma4_ple", 4)]}
SLOW_CASES = {1: [("gemma4_ple", 2), ("gemma4_ple", 7), ("gemma4_moe", 2), ("gemma4_moe", 4), ("gemma4_moe", 7)],
              2: [("gemma4_moe", 4)]}
TP2_CI_RELEASE = "sdk-2.28"  # CI runs TP 2 on one release (time); the other's TP 2 case is slow


def selection(release: str, tp: int, slow: bool) -> list[tuple[str, int]]:
    cases = (SLOW_CASES if slow else CI_CASES)[tp]
    if tp == 2 and release != TP2_CI_RELEASE:
        cases = [] if not slow else CI_CASES[2] + SLOW_CASES[2]
    return cases


def golden_name(target: str, k: int) -> str:
    return f"assistant_{target}_k{k}"


def assistant_goldens(cases: list[tuple[str, int]]) -> dict[str, dict]:
    specs = family_specs()
    out = {golden_name(t, k): dict(specs[t], prompt_lengths=PROMPTS, assistant={"seed": 5, "ks": [k]})
           for t, k in cases}
    # A target of another family: test_speculation_nxdi.py's spec_gemma3 (the same spec, so made once).
    out["spec_gemma3"] = dict(specs["gemma3"], prompt_lengths=PROMPTS)
    return out


_RUNS: dict[tuple[str, int, bool], list[dict] | str] = {}


def driver_records(sim, release: str, tp: int, slow: bool, tmp_path_factory) -> dict[str, dict]:
    if (release, tp, slow) not in _RUNS:
        sim.need(release)
        cases = selection(release, tp, slow)
        goldens = sim.goldens(assistant_goldens(cases or CI_CASES[1]))
        work = tmp_path_factory.mktemp(f"assistant_{release}_tp{tp}{'_slow' if slow else ''}")
        listed = [{"name": golden_name(t, k), "target": str(goldens[golden_name(t, k)]), "k": k, "rounds": True,
                   "draft": str(goldens[golden_name(t, k)] / "assistant")} for t, k in cases]
        refusals = []
        if tp == 1 and not slow:  # the refusals, once per release, with the CI case's pair
            first = goldens[golden_name(*CI_CASES[1][0])]
            refusals = ["--assistant-refusals", str(first / "ckpt"), str(first / "assistant"),
                        str(goldens["spec_gemma3"] / "ckpt")]
        _RUNS[(release, tp, slow)] = run_spec_driver(sim, release, tp, work, listed, refusals)
    result = _RUNS[(release, tp, slow)]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return {r["name"]: r for r in result}


def hf_acceptance(golden: dict, k: int) -> tuple[int, int]:
    """Accepted / proposed over HF's recorded steps (start length, proposals) against the target's greedy tokens."""
    accepted = proposed = 0
    for prompt, tokens, rounds in zip(golden["prompts"], golden["tokens"], golden["assistant"][str(k)]["hf_rounds"],
                                      strict=True):
        seq = prompt + tokens
        for start, proposals in rounds:
            proposed += len(proposals)
            for i, token in enumerate(proposals):
                if start + i >= len(seq) or seq[start + i] != token:
                    break
                accepted += 1
    return accepted, proposed


def params():
    for release in RELEASES:
        for tp in (1, 2):
            for slow in (False, True):
                for target, k in selection(release, tp, slow):
                    yield pytest.param(release, tp, slow, target, k, marks=[pytest.mark.slow] if slow else [],
                                       id=f"{release}-tp{tp}-{target}-k{k}")


@pytest.mark.parametrize(("release", "tp", "slow", "target", "k"), list(params()))
def test_assistant_fused_speculation(sim, sim_report, tmp_path_factory, release, tp, slow, target, k):
    record = driver_records(sim, release, tp, slow, tmp_path_factory).get(golden_name(target, k))
    assert record is not None, "the driver produced no record for this case"
    assert "error" not in record, f"raised in NxDI CPU mode ({release}, TP {tp}):\n{record['error']}"
    golden = json.loads((sim.golden_root / golden_name(target, k) / "golden.json").read_text())
    reference = golden["assistant"][str(k)]
    assert reference["hf_tokens"] == golden["tokens"]  # HF's assisted generation keeps the target's greedy output
    assert record["standins_called"] == [], "closed-source stand-ins called while generating"
    for row, (tokens, expected) in enumerate(zip(record["tokens"], golden["tokens"], strict=True)):
        assert len(set(expected)) >= 4, f"row {row}: HF's greedy tokens barely vary; the check proves little"
        assert tokens == expected, f"row {row} (prompt {len(golden['prompts'][row])}): {tokens} vs HF {expected}"
    for row, (ours, cpu) in enumerate(zip(record["rounds"], reference["cpu_rounds"], strict=True)):
        assert all(len(step) == k for step in ours)
        assert len(ours) <= len(cpu), f"row {row}: {len(ours)} steps, the CPU runtime took {len(cpu)}"
        differ = [i for i, (a, b) in enumerate(zip(ours, cpu[: len(ours)], strict=True)) if a != b]
        assert not differ, f"row {row}: step {differ[0]} proposed {ours[differ[0]]}, the CPU runtime {cpu[differ[0]]}"
    hf_accepted, hf_proposed = hf_acceptance(golden, k)
    sim_report(f"assistant fused-spec {release} tp{tp} {target} K={k}",
               f"acceptance NxDI {record['accepted']}/{record['proposed']} (HF {hf_accepted}/{hf_proposed}); "
               f"fused calls {record['target_calls']}; build {record['build_s']:.1f}s "
               f"generate {record['generate_s']:.1f}s")


REFUSALS = {  # bad combination -> words its one-line error must contain
    "assistant_kv_quant": "kv_cache_quant",
    "assistant_other_target": "Gemma 4 targets only",
}


@pytest.mark.parametrize("what", list(REFUSALS))
@pytest.mark.parametrize("release", RELEASES)
def test_assistant_bad_combinations_refused_before_build(sim, tmp_path_factory, release, what):
    record = driver_records(sim, release, 1, False, tmp_path_factory)[f"refuse-{what}"]
    assert record["refused"], f"{what}: built without an error"
    assert record["gemma_error"], f"{what}: {record['refused']} (not nxdi-gemma's one-line error): {record['message']}"
    assert "\n" not in record["message"] and REFUSALS[what] in record["message"], record["message"]


@pytest.mark.slow  # 108 s on the shared 2-core machine (two CLI processes); the graph itself is CI's case above
def test_cli_compile_with_assistant_then_generate(sim, tmp_path, sim_report):
    """`nxdi-gemma compile --draft ASSISTANT --num-speculative-tokens 4` then `generate --backend neuron` on NxDI 0.8,
    with the tier's Neuron-machine stand-ins (as test_speculation_nxdi.py's CLI test: compile saves neuron_config.json
    only, load is NxDI's CPU mode): the four prompts' tokens are HF's greedy ones."""
    import os
    import shutil
    import subprocess

    from nxdi_gemma.tiny import byte_tokenizer_json

    release = "sdk-2.28"
    sim.need(release)
    case = sim.goldens(assistant_goldens(CI_CASES[1]))[golden_name(*CI_CASES[1][0])]
    golden = json.loads((case / "golden.json").read_text())
    target = tmp_path / "target"
    shutil.copytree(case / "ckpt", target)
    (target / "tokenizer.json").write_text(byte_tokenizer_json())  # generate detokenizes
    config = tmp_path / "compile.json"
    config.write_text(json.dumps({"neuron_config": {"tp_degree": 1, "batch_size": 4, "seq_len": 64,
                                                    "max_context_length": 64, "torch_dtype": "float32",
                                                    "on_cpu": True}}))
    env = sim.env(release, "cpu")
    env.update(PYTHONPATH=os.pathsep.join([str(SIM / "vllm_site"), env["PYTHONPATH"]]), NXDI_GEMMA_SIM_VLLM="1")
    cli = [sys.executable, "-m", "nxdi_gemma.cli"]
    for argv in (["compile", "--model", str(target), "--config", str(config), "--out", str(tmp_path / "compiled"),
                  "--draft", str(case / "assistant"), "--num-speculative-tokens", "4"],
                 ["generate", "--backend", "neuron", "--model", str(target), "--compiled", str(tmp_path / "compiled"),
                  "--token-ids", "--max-new-tokens", str(golden["new_tokens"]),
                  *[a for p in golden["prompts"] for a in ("--prompt", json.dumps(p))]]):
        proc = subprocess.run([*cli, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{argv[0]} failed:\n{proc.stderr[-4000:]}"
    tokens = [json.loads(line)["tokens"] for line in proc.stdout.splitlines() if line.startswith('{"prompt"')]
    assert tokens == golden["tokens"]
    (summary,) = [line for line in proc.stderr.splitlines() if line.startswith("speculation (NxDI fused)")]
    sim_report("cli compile --draft (assistant) + generate --backend neuron, NxDI 0.8", summary)
