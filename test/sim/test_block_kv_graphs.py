"""The block KV layout's device graphs (issue 15), as XLA plans them (same harness as test_hlo_budgets.py: our class
traced through NxD's ModelBuilder with real torch-xla 2.9, compiled, not run, by XLA:CPU; `xla/stats.py`).

Gemma 3 1B attention geometry cut to 2 layers (sliding + full), float32, TP 1, prefix caching with block size 32 and
one sequence's worth of blocks, at seq_len 4096 and 16384: one context-encoding graph per (prefill, prefix) bucket
and one decode graph, no host syncs or CPU fallbacks while tracing, no float64, and decode bytes per step grow by
<= 1.5x the added KV cache bytes (as the contiguous layout's budget in test_hlo_budgets.py)."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.slow  # two compiles of the block layout's graphs; run with -m slow (not in .ci/run)
RELEASE = "sdk-2.28"
BLOCK = 32
MiB = 2**20


def job(seq: int) -> list[str]:
    neuron = {"is_block_kv_layout": True, "is_prefix_caching": True, "pa_block_size": BLOCK,
              "pa_num_blocks": seq // BLOCK, "enable_bucketing": True, "context_encoding_buckets": [512],
              "prefix_buckets": [seq], "token_generation_buckets": [seq]}
    return ["--geometry", "gemma-3-1b", "--layers", "2", "--set",
            json.dumps({"layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 131072}),
            "--seq-len", str(seq), "--neuron-config", json.dumps(neuron), "--mode", "compile"]


@pytest.fixture(scope="module")
def reports(sim, tmp_path_factory) -> list[dict]:
    sim.need(RELEASE)
    tmp = tmp_path_factory.mktemp("block_kv_graphs")
    dump = tmp / "xla_dump"
    (tmp / "jobs.json").write_text(json.dumps([[*job(seq), "--xla-dump", str(dump)] for seq in (4096, 16384)]))
    sim.run([sys.executable, "-m", "xla", "--jobs", str(tmp / "jobs.json"), "--json", str(tmp / "out.json")],
            RELEASE, mode="xla", timeout=1500)
    for f in sorted(dump.iterdir()):
        f.unlink()
    return json.loads((tmp / "out.json").read_text())


def test_static_graphs_no_f64_no_host_syncs(reports):
    for report in reports:
        names = sorted(report["graphs"])
        # NxDI's 2-D buckets: prefill 512 x prefix {0, seq}; decode: one bucket
        assert [n for n in names if n.startswith("context_encoding")] == ["context_encoding_model_bk0",
                                                                           "context_encoding_model_bk1"], names
        assert [n for n in names if n.startswith("token_generation")] == ["token_generation_model_bk0"], names
        for name, graph in report["graphs"].items():
            assert not graph["f64"] and not graph["xla"]["optimized_f64"], f"{name}: float64 {graph['f64'][:3]}"
            assert not graph["trace_host_syncs"], f"{name}: host syncs while tracing {graph['trace_host_syncs']}"
            assert not graph["alias_problems"], f"{name}: {graph['alias_problems']}"


@pytest.mark.xfail(strict=True, reason="measured 1.56x: decode gathers the full layer's blocks into a copy before "
                   "the attention dot (read + write + read); reading the block pool in place is not done yet")
def test_decode_bytes_track_kv(reports, sim_report):
    g4k, g16k = (r["graphs"]["token_generation_model_bk0"] for r in reports)
    added_kv = g16k["param_bytes"]["state"] - g4k["param_bytes"]["state"]
    added = g16k["xla"]["bytes_accessed"] - g4k["xla"]["bytes_accessed"]
    sim_report("block KV decode bytes/step 4096 -> 16384",
               f"{g4k['xla']['bytes_accessed'] / MiB:.1f} -> {g16k['xla']['bytes_accessed'] / MiB:.1f} MiB: "
               f"+{added / MiB:.1f} MiB for +{added_kv / MiB:.1f} MiB of KV ({added / added_kv:.2f}x, <= 1.5x)")
    assert added_kv > 0
    assert added <= 1.5 * added_kv, f"decode reads +{added / MiB:.0f} MiB per step for +{added_kv / MiB:.0f} MiB of KV"
