"""NxDI fused speculation (our class as target and as draft) in NxDI's CPU mode: greedy speculative output equals the
target's HF greedy golden, token for token, on NxDI 0.8 and 0.9.

Targets: Gemma 2, Gemma 3, Gemma 4 with PLE + KV sharing, Gemma 4 with K=V + MoE (window 8; prompts of 30, 5, 19 and
12 tokens, 24 new: past the window, four rows of a continuously batched step at different positions). Drafts: (a) the
target itself (every proposal accepted: fused calls per generated token <= 1/(K+1) + 0.02), (b) a random model of the
same configuration (seed 1: few accepted), (c) another family or feature set with a different window (5), head dims
(8, global 16) and 3 layers. K in {2, 4, 7}. One driver process per release and TP degree runs every case of that
run (start-up dominates); each case is then its own test.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import RELEASES, SIM, family_specs

K_VALUES = (2, 4, 7)
KINDS = ("self", "random", "other")
TARGETS = ("gemma2", "gemma3", "gemma4_ple", "gemma4_moe")
PROMPTS = [30, 5, 19, 12]
_SLA = ["sliding_attention", "full_attention", "sliding_attention"]


def other_draft(target: str, specs: dict) -> dict:
    """(c): another family or feature set than the target, window 5, head dims 8 (global 16), 3 layers."""
    base = {"gemma2": "gemma3", "gemma3": "gemma2", "gemma4_ple": "gemma4_moe", "gemma4_moe": "gemma4_ple"}[target]
    config = dict(specs[base]["config"], sliding_window=5, head_dim=8, num_hidden_layers=3)
    if base != "gemma2":
        config["layer_types"] = _SLA
    if base.startswith("gemma4"):
        config["global_head_dim"] = 16
        if config.get("num_kv_shared_layers"):
            config["num_kv_shared_layers"] = 1
    return config


def spec_goldens() -> dict[str, dict]:
    specs = family_specs()
    out = {}
    for target in TARGETS:
        out[f"spec_{target}"] = dict(specs[target], prompt_lengths=PROMPTS)
        # Drafts need only their checkpoints (make_goldens writes a tiny golden beside each).
        out[f"spec_{target}_random"] = dict(specs[target], seed=1, prompt_lengths=[4], new_tokens=2)
        out[f"spec_{target}_other"] = dict(specs[target], config=other_draft(target, specs), seed=2,
                                           prompt_lengths=[4], new_tokens=2)
    return out


# The cases of one driver run. CI: every target, kind and K at TP 1 on both releases, and at TP 2 (gloo, two processes)
# one case with every Gemma 4 feature between target and draft; the other TP 2 cases (every target and kind at K 4)
# are marked slow and run in a second driver process when selected.
TP2_CI = ("gemma4_ple", "other", 4)


def cases(tp: int, slow: bool) -> list[tuple[str, str, int]]:
    if tp == 1:
        return [] if slow else [(t, kind, k) for t in TARGETS for kind in KINDS for k in K_VALUES]
    every = [(t, kind, 4) for t in TARGETS for kind in KINDS]
    return [c for c in every if c != TP2_CI] if slow else [TP2_CI]


def case_name(target: str, kind: str, k: int) -> str:
    return f"{target}-{kind}-k{k}"


_RUNS: dict[tuple[str, int, bool], list[dict] | str] = {}


def run_spec_driver(sim, release: str, tp: int, work, listed: list[dict], extra: list[str]) -> list[dict] | str:
    """One spec_driver.py process (torchrun at TP > 1) over the `listed` cases, `extra` its further arguments: its
    records, or the failure's text (each test of the run then fails with it)."""
    (work / "cases.json").write_text(json.dumps(listed))
    launcher = sim.torchrun(tp) if tp > 1 else [sys.executable]
    proc = sim.run([*launcher, str(SIM / "spec_driver.py"), "--tp", str(tp), "--out", str(work / "out.json"), *extra,
                    str(work / "cases.json")], release, check=False, timeout=3000)
    return json.loads((work / "out.json").read_text()) if proc.returncode == 0 else sim.failure(proc)


def driver_records(sim, release: str, tp: int, tmp_path_factory, slow: bool = False) -> dict[str, dict]:
    if (release, tp, slow) not in _RUNS:
        sim.need(release)
        goldens = sim.goldens(spec_goldens())
        work = tmp_path_factory.mktemp(f"spec_{release}_tp{tp}{'_slow' if slow else ''}")
        listed = [{"name": case_name(t, kind, k), "target": str(goldens[f"spec_{t}"]), "k": k,
                   "draft": str(goldens[f"spec_{t}" if kind == "self" else f"spec_{t}_{kind}"] / "ckpt")}
                  for t, kind, k in cases(tp, slow)]
        refusals = ["--refusals", str(goldens["spec_gemma3"] / "ckpt")] if tp == 1 and not slow else []
        _RUNS[(release, tp, slow)] = run_spec_driver(sim, release, tp, work, listed, refusals)
    result = _RUNS[(release, tp, slow)]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return {r["name"]: r for r in result}


def params():
    for release in RELEASES:
        for tp in (1, 2):
            for slow in (False, True):
                for target, kind, k in cases(tp, slow):
                    yield pytest.param(release, tp, slow, target, kind, k, marks=[pytest.mark.slow] if slow else [],
                                       id=f"{release}-tp{tp}-{case_name(target, kind, k)}")


@pytest.mark.parametrize(("release", "tp", "slow", "target", "kind", "k"), list(params()))
def test_fused_speculation_equals_target_greedy(sim, sim_report, tmp_path_factory, release, tp, slow, target, kind, k):
    record = driver_records(sim, release, tp, tmp_path_factory, slow).get(case_name(target, kind, k))
    assert record is not None, "the driver produced no record for this case"
    assert "error" not in record, f"raised in NxDI CPU mode ({release}, TP {tp}):\n{record['error']}"
    sim_report(f"fused-spec {release} tp{tp} {case_name(target, kind, k)}",
               f"acceptance {record['acceptance']:.2f}  fused calls/token {record['calls_per_token']:.3f} "
               f"(1/(K+1) = {1 / (k + 1):.3f})  build {record['build_s']:.1f}s generate {record['generate_s']:.1f}s")
    assert record["standins_called"] == [], "closed-source stand-ins called while generating"
    for row, (tokens, golden) in enumerate(zip(record["tokens"], record["golden_tokens"], strict=True)):
        assert len(set(golden)) >= 4, f"row {row}: HF's greedy tokens barely vary; the check proves little"
        assert tokens == golden, f"row {row} (prompt {record['prompt_lengths'][row]}): {tokens} vs HF {golden}"
    if kind == "self":
        assert record["acceptance"] == 1.0
        assert record["calls_per_token"] <= 1 / (k + 1) + 0.02
    if kind == "random":
        assert record["acceptance"] < 0.5  # few accepted, output still the target's


REFUSALS = {  # bad combination -> words its one-line error must contain
    "vocab": "vocabulary",
    "draft_tp": "draft",
    "sampling": "sampling",
    "k_beyond_buckets": "bucket",
    "not_fused": "enable_fused_speculation",
}


@pytest.mark.parametrize("what", list(REFUSALS))
@pytest.mark.parametrize("release", RELEASES)
def test_bad_combinations_refused_before_build(sim, tmp_path_factory, release, what):
    record = driver_records(sim, release, 1, tmp_path_factory)[f"refuse-{what}"]
    assert record["refused"], f"{what}: built without an error"
    assert record["gemma_error"], f"{what}: {record['refused']} (not nxdi-gemma's one-line error): {record['message']}"
    assert "\n" not in record["message"] and REFUSALS[what] in record["message"], record["message"]


@pytest.mark.parametrize("kind", ["self", pytest.param("other", marks=pytest.mark.slow)])
def test_cli_compile_with_draft_then_generate(sim, tmp_path, sim_report, kind):
    """`nxdi-gemma compile --draft DIR --num-speculative-tokens 4` then `generate --backend neuron` on NxDI 0.8, with
    the tier's Neuron-machine stand-ins (vllm_standins.py: compile saves neuron_config.json only, load is NxDI's CPU
    mode): the four prompts' tokens are HF's greedy ones; the self-draft needs <= 1/(K+1) + 0.02 fused calls per
    token after the first."""
    import os
    import shutil
    import subprocess

    from nxdi_gemma.tiny import byte_tokenizer_json

    release = "sdk-2.28"
    goldens = sim.goldens(spec_goldens())
    golden = json.loads((goldens["spec_gemma3"] / "golden.json").read_text())
    target = tmp_path / "target"
    shutil.copytree(goldens["spec_gemma3"] / "ckpt", target)
    (target / "tokenizer.json").write_text(byte_tokenizer_json())  # generate detokenizes
    draft = target if kind == "self" else goldens["spec_gemma3_other"] / "ckpt"
    config = tmp_path / "compile.json"
    config.write_text(json.dumps({"neuron_config": {"tp_degree": 1, "batch_size": 4, "seq_len": 64,
                                                    "max_context_length": 64, "torch_dtype": "float32",
                                                    "on_cpu": True}}))
    env = sim.env(release, "cpu")
    env.update(PYTHONPATH=os.pathsep.join([str(SIM / "vllm_site"), env["PYTHONPATH"]]), NXDI_GEMMA_SIM_VLLM="1")
    cli = [sys.executable, "-m", "nxdi_gemma.cli"]
    for argv in (["compile", "--model", str(target), "--config", str(config), "--out", str(tmp_path / "compiled"),
                  "--draft", str(draft), "--num-speculative-tokens", "4"],
                 ["generate", "--backend", "neuron", "--model", str(target), "--compiled", str(tmp_path / "compiled"),
                  "--token-ids", "--max-new-tokens", str(golden["new_tokens"]),
                  *[a for p in golden["prompts"] for a in ("--prompt", json.dumps(p))]]):
        proc = subprocess.run([*cli, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{argv[0]} failed:\n{proc.stderr[-4000:]}"
    # generate prints one JSON object per prompt (NxD's own log lines go to stdout too)
    tokens = [json.loads(line)["tokens"] for line in proc.stdout.splitlines() if line.startswith('{"prompt"')]
    assert tokens == golden["tokens"]
    (summary,) = [line for line in proc.stderr.splitlines() if line.startswith("speculation (NxDI fused)")]
    sim_report(f"cli compile --draft ({kind}) + generate --backend neuron, NxDI 0.8", summary)
    if kind == "self":
        calls = float(summary.split(", ")[1].split()[0]) * golden["new_tokens"] / (golden["new_tokens"] - 1)
        assert calls <= 1 / 5 + 0.02, summary
