"""Quantized weights and KV cache in NxDI's CPU mode. Weights (`quantized: true`, int8 per output channel, NxD's QuantizedColumnParallel/RowParallel and our
per-expert MoE) in NxDI's CPU mode, NxDI 0.8 and 0.9, TP 1 and 2, against HF transformers run on an independently
int8-rounded copy of each checkpoint (`quantize.int8_rounded_reference`: torch's own per-channel quantizer,
dequantized to float32): 100% of its greedy tokens and float32 logits within the family's bound. The quantized
checkpoint is written by the model itself on first use (quantized_checkpoints_path does not exist yet), once per
case and shared by the TP runs; the test also checks that the reference differs from the unquantized model by far
more than the bound (the check can fail). KV cache (`kv_cache_quant: true`, fp8 e4m3): against HF whose cache rounds
what it stores to fp8 (quantize on write, dequantize on read; make_goldens.round_on_write_cache).
The opt-in quantized LM head (`quantize_lm_head: true`): against HF whose untied lm_head is the int8-rounded head
(make_goldens `int8_rounded_head`), vocab 263 so that TP 2 pads the head, gathered and (slow) sharded logits.
CI runs NxDI 0.8 (int8 at TP 1 and 2, the KV cache at TP 1, the quantized head at TP 2); the other combinations are
marked slow (`-m slow`).
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import FAMILIES, HUB_FAMILIES, RELEASES, SIM, family_specs
from sim_golden import load_golden

TP_DEGREES = (1, 2)
NEURON_CONFIG = {"quantized": True, "quantization_dtype": "int8", "quantization_type": "per_channel_symmetric"}
KV_NEURON_CONFIG = {"kv_cache_quant": True}  # f8e4m3, direct cast (NxDI's KVQuantizationConfig default)
FP8_NEURON_CONFIG = {"quantized": True, "quantization_dtype": "f8e4m3", "quantization_type": "per_channel_symmetric"}
# The opt-in quantized LM head (`quantize_lm_head`) on a vocabulary TP 2 does not divide (the head is padded by a
# row), Gemma 2 (final softcap after the dequantized matmul), Gemma 3 and Gemma 4 (PLE: the PLE table keeps the
# vocabulary too).
HEAD_FAMILIES = ("gemma2", "gemma3", "gemma4_ple")
HEAD_VOCAB = 263
HEAD_NEURON_CONFIG = {**NEURON_CONFIG, "quantize_lm_head": True}
SCHEME_CONFIGS = {"int8": NEURON_CONFIG, "kvfp8": KV_NEURON_CONFIG, "fp8hub": FP8_NEURON_CONFIG,
                  "int8head": HEAD_NEURON_CONFIG}
_RUNS: dict[tuple[str, int, str], list[dict] | str] = {}


def driver_records(sim, cases: dict, suffix: str, release: str, tp: int, tmp_path_factory) -> list[dict]:
    """One driver process per (release, TP, scheme) running every family; a failed process fails each test."""
    if (release, tp, suffix) not in _RUNS:
        sim.need(release)
        out = tmp_path_factory.mktemp(f"{suffix}_{release}_tp{tp}") / "records.json"
        launcher = sim.torchrun(tp) if tp > 1 else [sys.executable]
        args = ["--neuron-config", json.dumps(SCHEME_CONFIGS[suffix])]
        if SCHEME_CONFIGS[suffix].get("quantized"):  # quantized_checkpoints_path does not exist yet: written on first use
            args += ["--quantized-dir", str(tmp_path_factory.mktemp(f"quantized_ckpts_{suffix}_{release}_tp{tp}"))]
        proc = sim.run([*launcher, str(SIM / "nxdi_cpu_driver.py"), "--tp", str(tp), "--out", str(out), *args,
                        *[str(path) for name, path in cases.items() if name.endswith(f"_{suffix}")]], release,
                       check=False)
        _RUNS[(release, tp, suffix)] = json.loads(out.read_text()) if proc.returncode == 0 else sim.failure(proc)
    result = _RUNS[(release, tp, suffix)]
    if isinstance(result, str):
        pytest.fail(result, pytrace=False)
    return result


def check_records(records: list[dict], family: str, release: str, tp: int) -> None:
    assert records, f"the driver produced no record for {family}"
    errors = [r["error"] for r in records if "error" in r]
    assert not errors, f"{family} raised in NxDI CPU mode ({release}, TP {tp}):\n{errors[0]}"
    for r in records:
        assert r["standins_called"] == [], f"{family}: closed-source stand-ins called while generating"
        assert r["match"] == 1.0, f"{family} prompt {r['prompt']}: tokens {r['tokens']} vs {r['golden_tokens']}"
        assert r["max_abs_logit_diff"] <= r["bound"], (
            f"{family} prompt {r['prompt']}: max |logit diff| {r['max_abs_logit_diff']:.2e} > bound {r['bound']:.0e}")


def reference_effect(sim_golden_dir, plain_golden_dir) -> float:
    """max |logit diff| between the quantized reference and unquantized HF: what the test could miss."""
    reference, unquantized = load_golden(sim_golden_dir), load_golden(plain_golden_dir)
    return max((a - b).abs().max().item() for a, b in zip(reference.logits, unquantized.logits, strict=True))


def checked_records(sim, sim_report, tmp_path_factory, cases: dict, suffix: str, release: str, tp: int, family: str,
                    *, baseline, label: str, reference: str, effect_is: str, widen_bound=None) -> list[dict]:
    """The driver's records of `<family>_<suffix>` checked against their reference (every token, logits within the
    bound), reported, and the reference shown to differ from `baseline` (the golden without the scheme) by more than
    10x the bound, so the check can fail. `widen_bound(bound, effect)`: a bound that depends on that effect."""
    records = [r for r in driver_records(sim, cases, suffix, release, tp, tmp_path_factory)
               if r["case"] == f"{family}_{suffix}"]
    effect = reference_effect(cases[f"{family}_{suffix}"], baseline)
    if widen_bound:
        records = [dict(r, bound=widen_bound(r["bound"], effect)) for r in records]
    check_records(records, family, release, tp)
    sim_report(f"{label} {release} tp{tp} {family}",
               f"match {min(r['match'] for r in records):.3f}  max|dlogit| "
               f"{max(r['max_abs_logit_diff'] for r in records):.1e} vs {reference} (bound "
               f"{records[0]['bound']:.0e}; {effect_is} {effect:.1e})")
    assert effect > 10 * records[0]["bound"], f"{family}: {label} barely moves HF's logits; the check proves little"
    return records


def runs(in_ci: set[tuple[str, int]]) -> list:
    """(release, tp) parameters; those not in `in_ci` are marked slow (CI time: each is one driver process)."""
    return [pytest.param(release, tp, id=f"{release}-tp{tp}", marks=() if (release, tp) in in_ci else pytest.mark.slow)
            for release in RELEASES for tp in TP_DEGREES]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("release", "tp"), runs({("sdk-2.28", 1), ("sdk-2.28", 2)}))
def test_int8_weights_match_int8_rounded_hf(sim, goldens, int8_goldens, sim_report, tmp_path_factory, release, tp,
                                            family):
    records = checked_records(sim, sim_report, tmp_path_factory, int8_goldens, "int8", release, tp, family,
                              baseline=goldens[family], label="int8", reference="int8-rounded HF",
                              effect_is="int8-rounded vs unquantized HF")
    for r in records:
        assert {"QuantizedColumnParallel:int8", "QuantizedRowParallel:int8"} <= set(r["quantized_layers"])
        assert r["left_for_nxdi_convert"] == [], "NxDI's swap on device would convert these too"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("release", "tp"), runs({("sdk-2.28", 1)}))
def test_fp8_kv_cache_matches_round_on_write_hf(sim, goldens, kv_goldens, sim_report, tmp_path_factory, release, tp,
                                                family):
    """kv_cache_quant: K/V stored as fp8 e4m3 and cast back where read, against HF whose cache rounds what it
    stores to fp8 (a step's own K/V used as computed, earlier tokens' read back rounded).

    At TP 1 our K/V are HF's to float32 rounding and the bound is the family's. At TP 2 the row-parallel
    all-reduces sum in another order, K/V move by float32 ulps, and where such a value sits at an fp8 rounding
    midpoint the cache holds the neighbouring fp8 value (one step of a 3-bit mantissa): measured once in the four
    families (Gemma 4 PLE, 8.9e-3). There the test asks for every greedy token and a logit gap under 1% of what fp8
    rounding moves HF's logits by: far closer to the fp8 reference than to the unquantized model."""
    checked_records(sim, sim_report, tmp_path_factory, kv_goldens, "kvfp8", release, tp, family,
                    baseline=goldens[family], label="fp8 KV", reference="round-on-write HF",
                    effect_is="vs unquantized-cache HF",
                    widen_bound=(lambda bound, effect: max(bound, 0.01 * effect)) if tp > 1 else None)


@pytest.mark.parametrize("family", HUB_FAMILIES)
@pytest.mark.parametrize(("release", "tp"), [pytest.param("sdk-2.28", 1, id="sdk-2.28-tp1"),
                                             pytest.param("sdk-2.29", 2, id="sdk-2.29-tp2", marks=pytest.mark.slow)])
def test_fp8_hub_checkpoint(sim, goldens, hub_goldens, sim_report, tmp_path_factory, release, tp, family):
    """An FP8 compressed-tensors checkpoint (float8_e4m3fn weights, per-channel weight_scale, config.json
    quantization_config) given as the model with quantized fp8 weights: converted to NxD's fp8 scheme on first use
    (quantize.convert_prequantized), the greedy tokens and float32 logits of HF run on its dequantized weights."""
    records = checked_records(sim, sim_report, tmp_path_factory, hub_goldens, "fp8hub", release, tp, family,
                              baseline=goldens[family], label="fp8 hub", reference="HF on the dequantized FP8 weights",
                              effect_is="vs the unquantized model")
    for r in records:
        assert {"QuantizedColumnParallel:float8_e4m3fn", "QuantizedRowParallel:float8_e4m3fn"} <= set(
            r["quantized_layers"]), r["quantized_layers"]


@pytest.fixture(scope="session")
def head_goldens(sim) -> dict[str, object]:
    """Per family at vocab 263: HF on the int8-rounded copy with the LM head rounded too (`<family>_int8head`, the
    reference) and without (`<family>_int8body`, to show the head's rounding moves the logits)."""
    specs = {}
    for name, spec in family_specs().items():
        if name not in HEAD_FAMILIES:
            continue
        config = dict(spec["config"], vocab_size=HEAD_VOCAB)
        if config.get("vocab_size_per_layer_input"):
            config["vocab_size_per_layer_input"] = HEAD_VOCAB
        specs[f"{name}_int8head"] = dict(spec, config=config, weights="int8_rounded_head")
        specs[f"{name}_int8body"] = dict(spec, config=config, weights="int8_rounded")
    return sim.goldens(specs)


@pytest.mark.parametrize("family", HEAD_FAMILIES)
@pytest.mark.parametrize(("release", "tp"), runs({("sdk-2.28", 2)}))
def test_quantized_lm_head_matches_int8_rounded_head_hf(sim, head_goldens, sim_report, tmp_path_factory, release,
                                                        tp, family):
    """`quantize_lm_head: true`: the tied head's int8 copy (one scale per vocab row, written on first use into the
    quantized checkpoint) in our QuantizedSoftcapColumnParallel, against HF whose untied lm_head is that rounded
    copy while the embedding stays unrounded: every greedy token, float32 logits within the family's bound. Vocab
    263 at TP 2: the head and its scale are padded by a row and the pad column cut before the softcap."""
    records = checked_records(sim, sim_report, tmp_path_factory, head_goldens, "int8head", release, tp, family,
                              baseline=head_goldens[f"{family}_int8body"], label="int8 + LM head",
                              reference="HF with the int8-rounded head", effect_is="the head's rounding moves HF's logits by")
    for r in records:
        assert "QuantizedSoftcapColumnParallel:int8" in r["quantized_layers"], r["quantized_layers"]
        assert r["left_for_nxdi_convert"] == [], "NxDI's swap on device would convert these too"


@pytest.mark.slow  # one more torchrun (about 1 min); the gathered layout above is the CI case
def test_quantized_lm_head_sharded_logits(sim, head_goldens, sim_report, tmp_path):
    """The quantized head with on-device sampling at TP 2 (logits kept sharded: NxD's `pad=True`, the per-row
    scale padded with the weight, NxDI's mask on the pad column; test_tp_wide's driver): Gemma 2 (softcap), vocab
    263 -> 264 columns, the pad column at finfo.min, every real column within the bound of HF's rounded head."""
    release, tp, case = "sdk-2.28", 2, head_goldens["gemma2_int8head"]
    sim.need(release)
    out = tmp_path / "records.json"
    config = {**HEAD_NEURON_CONFIG, "quantized_checkpoints_path": str(tmp_path / "quantized")}
    sim.run([*sim.torchrun(tp), str(SIM / "test_tp_wide.py"), "--ods", "--tp", str(tp), "--out", str(out),
             "--neuron-config", json.dumps(config), str(case)], release, timeout=1800)
    records = json.loads(out.read_text())
    for r in records:
        assert r["width"] == HEAD_VOCAB + 1 and r["pad_columns_all_min"], (r["width"], r["pad_max"])
    check_records([dict(r, quantized_layers=[]) for r in records], "gemma2", release, tp)
    sim_report(f"int8 + LM head {release} tp{tp} gemma2 sharded logits",
               f"match {min(r['match'] for r in records):.3f}  max|dlogit| "
               f"{max(r['max_abs_logit_diff'] for r in records):.1e} (bound {records[0]['bound']:.0e})")
