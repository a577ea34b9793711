"""Quantized weights as device graphs (issue 18): the Gemma 3 1B geometry (2 layers: sliding + full, vocab 4096,
bfloat16, TP 1, seq_len 4096) traced through NxD's ModelBuilder with torch-xla 2.9 and compiled (not run) by XLA:CPU,
decode graph only, unquantized vs `quantized: true` with int8 and with fp8 (f8e4m3) weights, per channel.

- Bytes per decode step that weights and KV cache put on HBM: the graph's weight parameters (the embedding table
  excluded: a step gathers one row of it) plus its KV-cache state. The quantized graph's bytes must be exactly the
  unquantized graph's minus what quantization saves (the planner's quantized parameter count x 1 byte, plus a float32
  scale per output channel): nothing else is left to remove. The 0.55x target is then arithmetic, not measurement:
  at this geometry the bf16 LM head (vocab 4096 x 1152 x 2 B = 9 MiB) and the bf16 KV cache (4.5 MiB) stay, the 14
  linears go from 102.4 to 51.2 MiB (+0.1 MiB scales), so the floor is (51.3 + 9 + 4.5) / 115.9 = 0.559x. Without
  quantizing the LM head (kept in the model dtype by default) 0.55x is out of reach; the test bounds the whole at
  0.56x and the part quantization acts on (all but the LM head) at 0.55x (measured 0.522x). With the opt-in
  quantized head (`quantize_lm_head: true`, int8 and fp8 graphs `+head`) the whole step is bounded at 0.55x, again
  exactly the planner's saving (the head: 9 -> 4.5 MiB plus a float32 scale per vocab row).
- No dequantized (scaled) copy of a weight: no >= 1 MiB multiply in the traced HLO (the scales multiply the matmul
  outputs), no float64, and the graph's shapes are static (one traced graph per bucket). Each quantized weight is
  cast to bf16 right before its dot (NxD's layers do), which the device compiler is expected to fuse.
- XLA:CPU's own bytes-accessed figure is reported, not bounded: XLA:CPU converts every bf16 weight to a float32
  transposed copy for its dot kernels, unquantized or not, which neuronx-cc does not do.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import SIM

RELEASE = "sdk-2.28"
G3 = ["--geometry", "gemma-3-1b", "--layers", "2", "--set", json.dumps({"layer_types": ["sliding_attention",
      "full_attention"]}), "--seq-len", "4096", "--dtype", "bfloat16", "--mode", "compile", "--graphs", "token"]
SCHEMES = {"bf16": {}, "int8": {"quantization_dtype": "int8"}, "fp8": {"quantization_dtype": "f8e4m3"},
           "int8+head": {"quantization_dtype": "int8", "quantize_lm_head": True},
           "fp8+head": {"quantization_dtype": "f8e4m3", "quantize_lm_head": True}}
EMBEDDING_BYTES = 4096 * 1152 * 2  # vocab x hidden, bf16: gathered one row per step
MiB = 2**20


@pytest.fixture(scope="module")
def decode_graphs(sim, tmp_path_factory) -> dict[str, dict]:
    sim.need(RELEASE)
    tmp = tmp_path_factory.mktemp("quantized_hlo")
    jobs = []
    for name, fields in SCHEMES.items():
        config = {"quantized": True, "quantized_checkpoints_path": str(tmp / f"q_{name}"), **fields} if fields else {}
        jobs.append([*G3, "--neuron-config", json.dumps(config), "--xla-dump", str(tmp / "xla_dump")])
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    sim.run([sys.executable, "-m", "xla", "--jobs", str(tmp / "jobs.json"), "--json", str(tmp / "out.json")],
            RELEASE, mode="xla", timeout=1500, cwd=SIM)
    reports = json.loads((tmp / "out.json").read_text())
    return {name: next(iter(r["graphs"].values())) for name, r in zip(SCHEMES, reports, strict=True)}


def hbm_bytes(graph: dict) -> int:
    return graph["param_bytes"]["weight"] - EMBEDDING_BYTES + graph["param_bytes"]["state"]


def quantization_saving(head: bool = False) -> tuple[int, int]:
    """(bytes quantization removes, LM head bytes in bf16) at this geometry, from the planner's counts (independent of
    the graphs): each quantized parameter goes from 2 bytes to 1, plus 4 bytes of scale per output channel; `head`:
    the LM head quantized too (`quantize_lm_head`), one scale per vocab row."""
    from nxdi_gemma.benchmark import shrunk_config
    from nxdi_gemma.config import plan_from_config
    from nxdi_gemma.planning import parameter_counts
    from nxdi_gemma.public_models import public_config

    config = shrunk_config(public_config("gemma-3-1b"), 2, 4096)
    config.get("text_config", config).update({"layer_types": ["sliding_attention", "full_attention"]})
    plan = plan_from_config(config)
    counts = parameter_counts(plan)
    quantized, scales = counts["quantized"], counts["scales"]
    if head:
        quantized, scales = quantized + counts["head"], scales + counts["head_scales"]
    return quantized * (2 - 1) - 4 * scales, plan.vocab_size * plan.hidden_size * 2


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_decode_reads_fewer_bytes(decode_graphs, sim_report, scheme):
    base, quant = decode_graphs["bf16"], decode_graphs[scheme]
    ratio = hbm_bytes(quant) / hbm_bytes(base)
    saving, lm_head = quantization_saving()
    without_head = (hbm_bytes(quant) - lm_head) / (hbm_bytes(base) - lm_head)
    xla_ratio = quant["xla"]["bytes_accessed"] / base["xla"]["bytes_accessed"]
    sim_report(f"{scheme} decode bytes/step (weights + KV)",
               f"{hbm_bytes(base) / MiB:.1f} -> {hbm_bytes(quant) / MiB:.1f} MiB ({ratio:.3f}x; without the bf16 LM "
               f"head of {lm_head / MiB:.1f} MiB {without_head:.3f}x); XLA:CPU bytes accessed "
               f"{base['xla']['bytes_accessed'] / MiB:.1f} -> {quant['xla']['bytes_accessed'] / MiB:.1f}"
               f" MiB ({xla_ratio:.2f}x); large values {quant['large_values_by_op']}")
    # nothing but the quantized weights changed size: every avoidable byte is gone
    assert hbm_bytes(base) - hbm_bytes(quant) == saving, (hbm_bytes(base) - hbm_bytes(quant), saving)
    assert ratio <= 0.56, f"{scheme}: decode reads {ratio:.3f}x the unquantized graph's weight + KV bytes"
    assert without_head <= 0.55, f"{scheme}: {without_head:.3f}x without the LM head"


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_head_decode_reads_at_most_055x(decode_graphs, sim_report, scheme):
    """`quantize_lm_head: true`: the LM head's weight quantized too (one scale per vocab row): the issue's 0.55x on
    the whole decode step. Again exactly the planner's saving (the 14 linears and the head), nothing else."""
    base, quant = decode_graphs["bf16"], decode_graphs[f"{scheme}+head"]
    ratio = hbm_bytes(quant) / hbm_bytes(base)
    saving, _ = quantization_saving(head=True)
    sim_report(f"{scheme} + LM head decode bytes/step (weights + KV)",
               f"{hbm_bytes(base) / MiB:.1f} -> {hbm_bytes(quant) / MiB:.1f} MiB ({ratio:.3f}x; bf16 head "
               f"{hbm_bytes(decode_graphs[scheme]) / hbm_bytes(base):.3f}x); large values {quant['large_values_by_op']}")
    assert hbm_bytes(base) - hbm_bytes(quant) == saving, (hbm_bytes(base) - hbm_bytes(quant), saving)
    assert ratio <= 0.55, f"{scheme} + LM head: decode reads {ratio:.3f}x the unquantized graph's weight + KV bytes"


@pytest.mark.parametrize("scheme", ["int8", "fp8", "int8+head", "fp8+head"])
def test_no_dequantized_weight_copy(decode_graphs, scheme):
    graph = decode_graphs[scheme]
    assert "multiply" not in graph["large_values_by_op"], (
        f"{scheme}: a >= 1 MiB multiply in the decode graph (a dequantized weight?): {graph['large_values_by_op']}")
    assert not graph["f64"] and not graph["xla"]["optimized_f64"], f"{scheme}: float64 in the graph"
    # the scales multiply the outputs of the 14 quantized linears (2 layers x q, k, v, o, gate, up, down), and of
    # the LM head when it is quantized
    linears = 14 + scheme.endswith("+head")
    assert graph["ops"]["multiply"] - decode_graphs["bf16"]["ops"]["multiply"] == linears
