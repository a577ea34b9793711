"""The block KV layout's device graphs (issue 15), traced through NxD's ModelBuilder with real torch-xla 2.9 (the
harness of test_xla.py and test_hlo_budgets.py, `xla/`), in one process per release:

- Replay: every family (prefix_cache_driver.py's settings: block size 8, 3 rows, 2-D prefill x prefix buckets) fed
  as vllm-neuron feeds NxDI's block-KV path (a prompt, a second one, the first again reusing 3 of its cached blocks,
  all three decoding together), each graph traced once with NxDI's example inputs and executed as compiled through
  NxDI's host code: HF's greedy tokens and logits within the golden's bound on every request; one XLA compile per
  graph used over every call (static graphs: nothing value-dependent was baked in); no host sync or CPU fallback
  while tracing, no stand-in called, no float64.
- Budget: Gemma 3 1B attention geometry cut to 2 layers (sliding + full), float32, TP 1, block size 32, one
  sequence's worth of blocks, decode graph compiled (not run) by XLA:CPU at seq_len 4096 and 16384: bytes per step
  grow by <= 1.5x the added KV cache bytes, as the contiguous layout's budget in test_hlo_budgets.py. Decode
  multiplies a full layer's block pool in place (`block_kv.GemmaBlockKVCacheManager.pool`); the sliding layer reads
  its window's blocks.

Releases: NxDI 0.8 by default, more with NXDI_GEMMA_SIM_XLA_RELEASES (as test_xla.py). About 3 minutes per release
on 2 cores (import, 4 replays, 2 compiles): it is the issue's XLA acceptance case, so it runs in CI.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import FAMILIES

RELEASES = tuple(os.environ.get("NXDI_GEMMA_SIM_XLA_RELEASES", "sdk-2.28").split(","))
BLOCK = 32
SEQ_LENS = (4096, 16384)
MiB = 2**20


def budget_job(seq: int, dump: str) -> list[str]:
    neuron = {"is_block_kv_layout": True, "is_prefix_caching": True, "pa_block_size": BLOCK,
              "pa_num_blocks": seq // BLOCK, "enable_bucketing": True, "context_encoding_buckets": [512],
              "prefix_buckets": [seq], "token_generation_buckets": [seq]}
    return ["--geometry", "gemma-3-1b", "--layers", "2", "--set",
            json.dumps({"layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 131072}),
            "--seq-len", str(seq), "--neuron-config", json.dumps(neuron), "--mode", "compile",
            "--graphs", "token_generation", "--xla-dump", dump]


@pytest.fixture(scope="module", params=RELEASES)
def runs(request, sim, goldens, tmp_path_factory) -> dict:
    """{"release": ..., family: replay report, seq_len: budget report} for one release."""
    release = request.param
    sim.need(release)
    tmp = tmp_path_factory.mktemp(f"block_kv_graphs_{release}")
    dump = tmp / "xla_dump"
    jobs = [budget_job(seq, str(dump)) for seq in SEQ_LENS]  # first: the dump folder sees only their compiles
    jobs += [["--case", str(goldens[f]), "--prefix-caching"] for f in FAMILIES]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    sim.run([sys.executable, "-m", "xla", "--jobs", str(tmp / "jobs.json"), "--json", str(tmp / "out.json")],
            release, mode="xla", timeout=1800)
    for f in sorted(dump.iterdir()):
        f.unlink()
    reports = json.loads((tmp / "out.json").read_text())
    return {"release": release, **dict(zip([*SEQ_LENS, *FAMILIES], reports, strict=True))}


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_exact_to_hf(runs, family, sim_report):
    result = runs[family]["replay"]
    records = result["records"]
    assert [r["request"] for r in records] == ["A", "B", "C"]
    for r in records:
        assert r["match"] == 1.0, f"request {r['request']}: {r['tokens']} vs HF {r['golden_tokens']}"
        assert r["max_abs_logit_diff"] <= r["bound"], f"request {r['request']}: {r['max_abs_logit_diff']:.2e}"
    reused = records[2]
    assert reused["prefill_tokens_fed"] < reused["prompt_len"], "the reused prompt was recomputed whole"
    sim_report(f"xla {runs['release']} block KV {family}",
               f"max |logit diff| {max(r['max_abs_logit_diff'] for r in records):.1e} (bound {records[0]['bound']:.0e}),"
               f" reused request fed {reused['prefill_tokens_fed']} of {reused['prompt_len']} prompt tokens, "
               f"calls {result['calls']}")


@pytest.mark.parametrize("family", FAMILIES)
def test_static_graphs_no_f64_no_host_syncs(runs, family):
    report = runs[family]
    result = report["replay"]
    names = sorted(report["graphs"])
    # NxDI's 2-D buckets: prefill {16, 64} x prefix {0, 32, 64}; decode: one bucket
    assert len([n for n in names if n.startswith("context_encoding")]) == 6, names
    assert [n for n in names if n.startswith("token_generation")] == ["token_generation_model_bk0"], names
    used = set(result["calls"])
    assert used <= set(names) and "token_generation_model_bk0" in used
    assert sum(n.startswith("context_encoding") for n in used) >= 2, "no prefill with a cached prefix"
    assert result["xla_compiles"] == len(used), f"a graph compiled more than once: {result['compiled_at']}"
    assert not result["weight_problems"]
    for name, graph in report["graphs"].items():
        assert not graph["f64"], f"{name}: float64 {graph['f64'][:3]}"
        assert not graph["trace_host_syncs"], f"{name}: host syncs while tracing {graph['trace_host_syncs']}"
        assert not graph["alias_problems"], f"{name}: {graph['alias_problems']}"
    for r in result["records"]:
        assert not r["standins_called"], f"stand-ins called while generating: {r['standins_called']}"


def test_decode_bytes_track_kv(runs, sim_report):
    g4k, g16k = (runs[seq]["graphs"]["token_generation_model_bk0"] for seq in SEQ_LENS)
    for graph in (g4k, g16k):
        assert not graph["f64"] and not graph["xla"]["optimized_f64"]
        assert not graph["trace_host_syncs"]
    added_kv = g16k["param_bytes"]["state"] - g4k["param_bytes"]["state"]
    added = g16k["xla"]["bytes_accessed"] - g4k["xla"]["bytes_accessed"]
    sim_report(f"xla {runs['release']} block KV decode bytes/step 4096 -> 16384",
               f"{g4k['xla']['bytes_accessed'] / MiB:.1f} -> {g16k['xla']['bytes_accessed'] / MiB:.1f} MiB: "
               f"+{added / MiB:.1f} MiB for +{added_kv / MiB:.1f} MiB of KV ({added / added_kv:.2f}x, <= 1.5x)")
    assert added_kv > 0
    assert added <= 1.5 * added_kv, f"decode reads +{added / MiB:.0f} MiB per step for +{added_kv / MiB:.0f} MiB of KV"
