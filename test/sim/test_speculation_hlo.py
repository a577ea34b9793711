"""NxDI's fused speculation graph with our class as target and draft, traced through NxD's ModelBuilder with real
torch-xla 2.9 and compiled (not run) by XLA:CPU (`python -m xla --draft ...`, as test_hlo_budgets.py does for the
plain graphs): static (one graph per bucket, the same HLO size at 4096 and 16384), no host syncs or CPU fallbacks
while tracing, no float64, no aliasing problem (the caches of draft and target updated in place), and bytes per call
<= 1.3 x (target decode bytes + K x draft decode bytes): verifying K + 1 tokens reads the target's weights once.

Geometry: Gemma 3 1B's attention cut to 2 layers (sliding window 512 + full), vocab 4096, float32, TP 1, as
test_hlo_budgets.py; the target is its own draft (K = 4, speculation_length 5), so the draft's decode bytes are the
plain decode graph's. NxDI 0.8.
"""

from __future__ import annotations

import json
import sys

import pytest

RELEASE = "sdk-2.28"
K = 4
SEQ_LENS = (4096, 16384)
G3 = ["--geometry", "gemma-3-1b", "--layers", "2", "--set",
      json.dumps({"layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 131072}),
      "--mode", "compile"]
MiB = 2**20


@pytest.fixture(scope="module")
def graphs(sim, tmp_path_factory) -> dict[tuple[int, str], dict]:
    """(seq_len, "decode" | "fused") -> the graph's report, all compiled in one process."""
    sim.need(RELEASE)
    tmp = tmp_path_factory.mktemp("spec_hlo")
    jobs = []
    for seq in SEQ_LENS:
        jobs.append([*G3, "--seq-len", str(seq), "--graphs", "token_generation"])
        jobs.append([*G3, "--seq-len", str(seq), "--graphs", "fused_speculation", "--draft", "self",
                     "--speculation-length", str(K + 1)])
    jobs = [[*job, "--xla-dump", str(tmp / "xla_dump")] for job in jobs]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    sim.run([sys.executable, "-m", "xla", "--jobs", str(tmp / "jobs.json"), "--json", str(tmp / "out.json")],
            RELEASE, mode="xla", timeout=1500)
    reports = json.loads((tmp / "out.json").read_text())
    for f in sorted((tmp / "xla_dump").iterdir()):
        f.unlink()
    out = {}
    for report, (seq, kind) in zip(reports, [(s, k) for s in SEQ_LENS for k in ("decode", "fused")], strict=True):
        tag = "token_generation" if kind == "decode" else "fused_speculation"
        (name, graph), = ((n, g) for n, g in report["graphs"].items() if n.startswith(tag))
        out[(seq, kind)] = graph
    return out


def test_fused_graph_static_no_syncs_no_f64(graphs, sim_report):
    for seq in SEQ_LENS:
        graph = graphs[(seq, "fused")]
        assert not graph["f64"], f"{seq}: float64 in the fused graph: {graph['f64'][:3]}"
        assert not graph["s64_seq_by_seq"], f"{seq}: int64 S x S values: {graph['s64_seq_by_seq'][:3]}"
        assert not graph["trace_host_syncs"], f"{seq}: host syncs / CPU fallbacks: {graph['trace_host_syncs']}"
        assert not graph["alias_problems"], f"{seq}: aliasing problems: {graph['alias_problems']}"
    small, large = (graphs[(s, "fused")]["instructions"] for s in SEQ_LENS)
    sim_report("fused speculation HLO instructions 4096 -> 16384", f"{small} -> {large}")
    assert small == large, "the fused graph's size depends on the sequence length"


@pytest.mark.parametrize("seq", SEQ_LENS)
def test_fused_bytes_per_call(graphs, sim_report, seq):
    decode = graphs[(seq, "decode")]["xla"]["bytes_accessed"]
    fused = graphs[(seq, "fused")]["xla"]["bytes_accessed"]
    budget = 1.3 * (decode + K * decode)
    sim_report(f"fused speculation bytes/call at {seq} (K={K}, self-draft)",
               f"{fused / MiB:.1f} MiB vs decode {decode / MiB:.1f} MiB: {fused / (decode + K * decode):.2f}x "
               f"(target + K x draft decode bytes; <= 1.3x)")
    assert fused <= budget, f"{seq}: fused {fused / MiB:.0f} MiB > 1.3 x {(decode + K * decode) / MiB:.0f} MiB"
