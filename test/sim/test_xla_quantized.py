"""Quantized weights and KV cache traced through NxD's ModelBuilder with torch-xla 2.9 and replayed on PJRT CPU (the
XLA tier of test_xla.py: each graph traced once with NxDI's example inputs, then executed as compiled through NxDI's
host code), against the same references as NxDI CPU mode (test_quantized.py):

- `int8`: `quantized: true`, int8 per output channel (NxD's QuantizedColumnParallel / RowParallel, our per-expert
  MoE), vs HF transformers run on an independently int8-rounded copy of the checkpoint. The quantized checkpoint is
  written by the model on first use (quantized_checkpoints_path does not exist yet) and loaded through NxD's own
  checkpoint sharding (`ModelBuilder.shard_checkpoint`), int8 weights and float32 scales by name.
- `fp8`: `quantized: true`, f8e4m3 per channel, from an FP8 compressed-tensors checkpoint (converted on first use)
  vs HF on its dequantized weights: fp8 weights execute on XLA:CPU (HUB_FAMILIES: the dense families).
- `kvfp8`: `kv_cache_quant: true` (K/V stored as fp8 e4m3, cast back where read) vs HF whose cache rounds what it
  stores to fp8 (quantize on write, dequantize on read). The prompt is prefilled in one call: the reference keeps a
  prompt's own K/V as computed, while chunked prefill reads earlier chunks back from the fp8 cache (measured with
  chunks of 8 on Gemma 3: first divergence at step 3, max |logit diff| 6.3e-2, as expected of a different rounding).
  XLA's float32 K/V differ from HF's by ulps (another op order), and where such a value sits at an fp8 rounding
  midpoint the cache holds the neighbouring fp8 value: Gemma 4 PLE measures 8.9e-3 with every token, the value NxDI
  CPU mode measures at TP 2 (whose all-reduce order moves K/V the same way). Measured step by step against NxDI CPU
  mode at TP 1 (which matches HF within 5e-6): the two caches are identical byte for byte except one value of a
  sliding layer's ring written at decode step 3, 0.6875 on XLA vs 0.75 (one fp8 code apart; 0.71875 is the
  midpoint), until the ring overwrites it at step 11; the logits differ by 8.9e-3 at step 4 and by <= 6e-6 outside
  steps 4-10. For that family (FP8_MIDPOINT_FAMILIES), as test_quantized.py does at TP 2, the bound is the family's
  or 1% of what fp8 rounding of the cache moves HF's logits by, whichever is larger; the others keep the family's.

Each case: 100% of the reference's greedy tokens and max |logit diff| within the bound over prompts of 30 (> 3x the
window of 8) and 5 tokens with 24 new tokens; the reference differs from the unquantized model by far more than the
bound (the check can fail); the graph holds the quantized dtype (int8 / fp8 weight parameters, fp8 KV state); one
XLA compile per submodel and bucket, every graph used; no host sync or CPU fallback while tracing, no stand-in
called while generating, no float64; the KV state round-trips through the aliased outputs.

CI runs NxDI 0.8 on three cases in one `python -m xla --jobs` process (CI_CASES: int8 Gemma 4 K=V + MoE, fp8 KV
Gemma 4 PLE + KV sharing, fp8 weights Gemma 3), with the trace of a shipped int8 compile config
(test_int8_compile_config_traces); the other cases and NxDI 0.9 are marked slow (one process each).
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import FAMILIES, HUB_FAMILIES, RELEASES, REPO
from sim_golden import load_golden

INT8 = {"quantized": True, "quantization_dtype": "int8", "quantization_type": "per_channel_symmetric"}
FP8 = {"quantized": True, "quantization_dtype": "f8e4m3", "quantization_type": "per_channel_symmetric"}
CHUNK = 8  # quantized weights: the 30-token prompt runs as 4 chunks through one graph (as test_xla.py)
CTX = 32  # max_context_length: the fp8 KV cache's prompts run in one call (see above)
# scheme -> (golden fixture, neuron config, prefill chunk)
SCHEMES = {"int8": ("int8_goldens", INT8, CHUNK), "fp8": ("hub_goldens", FP8, CHUNK),
           "kvfp8": ("kv_goldens", {"kv_cache_quant": True}, CTX)}
GOLDEN_SUFFIX = {"int8": "int8", "fp8": "fp8hub", "kvfp8": "kvfp8"}
CASES = [(f, s) for s in SCHEMES for f in (HUB_FAMILIES if s == "fp8" else FAMILIES)]
CI_RELEASE = "sdk-2.28"
CI_CASES = {("gemma4_moe", "int8"), ("gemma4_ple", "kvfp8"), ("gemma3", "fp8")}
FP8_MIDPOINT_FAMILIES = {"gemma4_ple"}  # kvfp8: one cached value one fp8 code from HF's (module docstring)
QUANTIZED_PARAMETER = {"int8": "parameter s8", "fp8": "parameter f8e4m3fn"}
# A shipped int8 compile config (scripts/make_compile_configs.py) traced as shipped, its model cut to 2 layers and
# vocab 4096 (config only: trace mode), in the CI process: TP 2, seq_len 32768, 1 context + 7 token-generation buckets.
COMPILE_CONFIG = REPO / "compile_configs" / "gemma-4-12b__inf2.xlarge__int8.json"
_RUNS: dict[tuple[str, bool], dict | str] = {}


def in_ci(release: str, case: tuple[str, str]) -> bool:
    return release == CI_RELEASE and case in CI_CASES


def params() -> list:
    return [pytest.param(release, family, scheme, id=f"{release}-{family}-{scheme}",
                         marks=() if in_ci(release, (family, scheme)) else pytest.mark.slow)
            for release in RELEASES for family, scheme in CASES]


def replays(request, sim, release: str, ci: bool, tmp_path_factory) -> dict:
    """{(family, scheme): report of `python -m xla`} of every case in the same group (CI, or the rest of the
    release), all in one process; a failed process fails each test of its group."""
    key = (release, ci)
    if key not in _RUNS:
        sim.need(release)
        tmp = tmp_path_factory.mktemp(f"xla_quantized_{release}_{'ci' if ci else 'slow'}")
        cases = [c for c in CASES if in_ci(release, c) == ci]
        jobs = []
        for family, scheme in cases:
            fixture, config, chunk = SCHEMES[scheme]
            case_dir = request.getfixturevalue(fixture)[f"{family}_{GOLDEN_SUFFIX[scheme]}"]
            config = dict(config, prefill_chunk_size=chunk)
            if config.get("quantized"):  # does not exist yet: the model writes it on first use
                config["quantized_checkpoints_path"] = str(tmp / f"quantized_{family}_{scheme}")
            jobs.append(["--case", str(case_dir), "--seq-len", "64", "--ctx-len", str(CTX),
                         "--neuron-config", json.dumps(config)])
        if ci:  # the shipped int8 compile config, traced (TP 2 cannot run on PJRT CPU) in the same process
            spec = json.loads(COMPILE_CONFIG.read_text())
            config = dict(spec["neuron_config"], quantized_checkpoints_path=str(tmp / "quantized_config"))
            jobs.append(["--geometry", spec["model"], "--layers", "2", "--tp", str(config["tp_degree"]),
                         "--seq-len", str(config["seq_len"]), "--dtype", config["torch_dtype"], "--mode", "trace",
                         "--neuron-config", json.dumps(config)])
            cases = [*cases, ("compile_config", "int8")]
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        proc = sim.run([sys.executable, "-m", "xla", "--jobs", str(tmp / "jobs.json"), "--json", str(tmp / "out.json")],
                       release, mode="xla", timeout=2400, check=False)
        if proc.returncode == 0:
            _RUNS[key] = dict(zip(cases, json.loads((tmp / "out.json").read_text()), strict=True))
        else:
            _RUNS[key] = sim.failure(proc)
    result = _RUNS[key]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return result


def reference_effect(case_dir, plain_dir) -> float:
    """max |logit diff| between the quantized reference and unquantized HF: what the test could miss."""
    reference, unquantized = load_golden(case_dir), load_golden(plain_dir)
    return max((a - b).abs().max().item() for a, b in zip(reference.logits, unquantized.logits, strict=True))


@pytest.mark.parametrize(("release", "family", "scheme"), params())
def test_quantized_replay_exact_to_reference(request, sim, goldens, sim_report, tmp_path_factory, release, family,
                                             scheme):
    report = replays(request, sim, release, in_ci(release, (family, scheme)), tmp_path_factory)[(family, scheme)]
    case_dir = request.getfixturevalue(SCHEMES[scheme][0])[f"{family}_{GOLDEN_SUFFIX[scheme]}"]
    result = report["replay"]
    effect = reference_effect(case_dir, goldens[family])
    bound = load_golden(case_dir).bound
    if scheme == "kvfp8" and family in FP8_MIDPOINT_FAMILIES:
        bound = max(bound, 0.01 * effect)  # an fp8 rounding midpoint: see the module docstring
    sim_report(f"xla {release} {scheme} {family}",
               f"token match {result['token_match']:.3f}, max |logit diff| {result['max_abs_logit_diff']:.2e} "
               f"(bound {bound:.1e}; reference vs unquantized HF {effect:.1e}), XLA compiles {result['xla_compiles']}"
               f", replay {result['seconds']} s")
    assert effect > 10 * bound, f"{family} {scheme}: the quantized reference barely moves HF's logits; proves little"
    assert len(result["prompts"]) == 2
    for r in result["prompts"]:
        n = r["prompt_len"]
        assert r["match"] == 1.0, f"prompt of {n}: tokens {r['tokens']} differ from the reference's from step " \
                                  f"{r['first_divergence']}"
        assert r["max_abs_logit_diff"] <= bound, f"prompt of {n}: max |logit diff| {r['max_abs_logit_diff']:.3e} > " \
                                                 f"{bound:.1e}"
    chunks = -(-30 // SCHEMES[scheme][2])
    assert result["calls"]["context_encoding_model_bk0"] == chunks + 1  # the 30-token prompt, then the 5-token one

    # the quantized dtype is what the graphs hold
    for name, graph in report["graphs"].items():
        if scheme in QUANTIZED_PARAMETER:
            assert graph["op_types"].get(QUANTIZED_PARAMETER[scheme], 0) > 0, (
                f"{name}: no {QUANTIZED_PARAMETER[scheme]} weight in the graph: {graph['op_types']}")
        values = sum(a * b * c * d for a, b, c, d in graph["state_shapes"].values())
        per_value = graph["param_bytes"]["state"] / values
        assert per_value == (1 if scheme == "kvfp8" else 4), f"{name}: the KV state holds {per_value} bytes a value"

    # static graphs, no host syncs, no float64, the KV state carried through the aliased outputs
    assert set(result["calls"]) == set(report["graphs"]), "every traced graph is used, nothing else is called"
    assert result["xla_compiles"] == len(report["graphs"]), (
        f"{result['xla_compiles']} XLA compiles for {len(report['graphs'])} graphs over prefill + every decode step")
    assert not result["weight_problems"], result["weight_problems"]
    assert result["standins_called"] == [], "closed-source stand-ins called while generating"
    for name, graph in report["graphs"].items():
        assert not graph["trace_host_syncs"], f"{name}: host syncs / CPU fallbacks while tracing: " \
                                              f"{graph['trace_host_syncs']}"
        assert not graph["f64"], f"{name}: float64 in the HLO: {graph['f64'][:3]}"
        assert graph["states"] and not graph["alias_problems"], f"{name}: KV state {graph['alias_problems']}"
    assert result["kv_state_effect"] > 1e-3, "zeroing the carried KV state left the decode logits unchanged"


def test_int8_compile_config_traces(request, sim, sim_report, tmp_path_factory):
    """The shipped Gemma 4 12B int8 config for inf2.xlarge (TP 2, batch 4, seq_len 32768, chunks of 128, bucketed
    token generation, greedy on-device sampling) traces every graph through NxD's ModelBuilder: int8 weights in each,
    the row-parallel all-reduces, no float64, no int64 S x S value, no host sync, the KV cache aliased."""
    report = replays(request, sim, CI_RELEASE, True, tmp_path_factory)[("compile_config", "int8")]
    config = json.loads(COMPILE_CONFIG.read_text())["neuron_config"]
    graphs = report["graphs"]
    sim_report(f"xla {CI_RELEASE} int8 compile config {COMPILE_CONFIG.stem}",
               f"{len(graphs)} graphs traced in {report['trace_seconds']} s (2 layers, vocab 4096); int8 weight "
               f"parameters per graph {sorted({g['op_types'].get('parameter s8', 0) for g in graphs.values()})}")
    assert len(graphs) == len(config["context_encoding_buckets"]) + len(config["token_generation_buckets"])
    for name, graph in graphs.items():
        # 2 layers x (fused QKV, o, gate, up, down)
        assert graph["op_types"].get("parameter s8", 0) == 10, f"{name}: int8 weights {graph['op_types']}"
        assert not graph["f64"], f"{name}: float64 in the HLO: {graph['f64'][:3]}"
        assert not graph["s64_seq_by_seq"], f"{name}: int64 S x S values: {graph['s64_seq_by_seq'][:3]}"
        assert not graph["trace_host_syncs"], f"{name}: host syncs while tracing: {graph['trace_host_syncs']}"
        assert graph["states"] and not graph["alias_problems"], f"{name}: KV state {graph['alias_problems']}"
        reduces = sum(n for op, n in graph["collectives"].items() if op.startswith("all-reduce"))
        assert reduces >= 2, f"{name}: TP 2 graph without the row-parallel all-reduces: {graph['collectives']}"
