"""Tensor parallelism beyond 2 with a vocabulary the TP degree does not divide (issue 10 item 6), in NxDI's CPU mode
over gloo: every real token's logit equals HF's over the WHOLE vocabulary (max |logit diff| within the golden's
spec 8.1 bound), on Gemma 2, Gemma 3 and Gemma 4 (PLE + KV sharing; K=V + MoE).

The LM head is padded to a multiple of TP rows. NxD strips that padding when it gathers the logits, and NxDI's model
forward then masks the last `pad_size` columns of what it believes are still padded logits (`mask_padded_logits`,
0.8 and 0.9): before our fix the last real tokens (260 and 261 of 262 at TP 4) came out as finfo.min. Both layouts
are checked: gathered logits (the default; our head pads and cuts itself) and logits kept sharded for on-device
sampling (NxD's padding and NxDI's mask, which is right there; `output_logits` then gathers the padded width with
the pad columns at finfo.min).

Fixtures: the tier's families with 8 query heads (TP 8 splits them; 2 or 1 KV heads are replicated) and vocab 262
(262 % 4 = 2, 262 % 8 = 6). TP 8 is 8 processes on this machine's cores: slow, and marked so.

This file is also the on-device-sampling driver (`python test_tp_wide.py --ods ...` under torchrun), since the
tier's nxdi_cpu_driver compares logits of the vocabulary's width only.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from conftest import RELEASES, family_specs

WIDE = {"num_attention_heads": 8, "vocab_size": 262}
FAMILY_NAMES = ("gemma2", "gemma3", "gemma4_ple", "gemma4_moe")


def wide_specs() -> dict[str, dict]:
    specs = {}
    for name, spec in family_specs().items():
        config = dict(spec["config"], **WIDE)
        if config.get("vocab_size_per_layer_input"):
            config["vocab_size_per_layer_input"] = WIDE["vocab_size"]
        specs[f"wide_{name}"] = dict(spec, config=config)
    return specs


def check(records: list[dict], cases: list[str], tp: int, label: str, sim_report) -> None:
    assert sorted({r["case"] for r in records}) == sorted(cases), label
    worst: dict[str, float] = {}
    for r in records:
        where = f"{label} {r['case']} prompt {r['prompt']}"
        assert r["tp"] == tp, where
        assert not r["standins_called"], f"{where}: stand-ins called while generating: {r['standins_called']}"
        assert r["match"] == 1.0, f"{where}: tokens {r['tokens']} vs HF {r['golden_tokens']}"
        assert r["max_abs_logit_diff"] <= r["bound"], f"{where}: max |logit diff| {r['max_abs_logit_diff']:.3g} " \
                                                      f"> bound {r['bound']:.3g} over the whole vocabulary"
        worst[r["case"]] = max(worst.get(r["case"], 0.0), r["max_abs_logit_diff"])
    sim_report(label, ", ".join(f"{case} {diff:.1e}" for case, diff in worst.items()))


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def wide_goldens(sim):
    from sim_golden import load_golden

    goldens = sim.goldens(wide_specs())
    for case in goldens.values():
        vocab = load_golden(case).logits[0].shape[-1]
        assert vocab == WIDE["vocab_size"] and vocab % 4 and vocab % 8, f"{case}: vocab {vocab}"
    return goldens


@pytest.mark.parametrize("tp", [4, pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("release", [pytest.param(r, marks=pytest.mark.slow) if r != RELEASES[0] else r
                                     for r in RELEASES])  # CI time: TP 4 on one release (~2.5 min each), both with -m slow
def test_gathered_logits_whole_vocab(sim, wide_goldens, sim_report, release, tp, tmp_path):
    cases = [f"wide_{name}" for name in FAMILY_NAMES]
    records = []
    for case in cases:  # one torchrun per case: re-creating gloo groups in one process can hang under load
        out = tmp_path / f"{case}.json"
        sim.run([*sim.torchrun(tp), "nxdi_cpu_driver.py", "--tp", str(tp), "--out", str(out),
                 str(wide_goldens[case])], release, timeout=1800)
        records += json.loads(out.read_text())
    check(records, cases, tp, f"TP {tp}, vocab 262, gathered logits, {release}", sim_report)


@pytest.mark.parametrize("release", [pytest.param(r, marks=pytest.mark.slow) if r != RELEASES[0] else r
                                     for r in RELEASES])  # CI time: one release in CI, both with -m slow
def test_sharded_logits_on_device_sampling(sim, wide_goldens, sim_report, release, tmp_path):
    tp = 4
    # Gemma 2 (final softcap on the shards) and Gemma 4 (MoE): the head is the same class for every family.
    cases = ["wide_gemma2", "wide_gemma4_moe"]
    records = []
    for case in cases:
        out = tmp_path / f"{case}.json"
        sim.run([*sim.torchrun(tp), __file__, "--ods", "--tp", str(tp), "--out", str(out), str(wide_goldens[case])],
                release, timeout=1800)
        records += json.loads(out.read_text())
    for r in records:
        where = f"{r['case']} prompt {r['prompt']}"
        # NxD pads 262 to 264 columns at TP 4; output_logits gathers them all; the 2 pads must be masked.
        assert r["width"] == WIDE["vocab_size"] + (-WIDE["vocab_size"] % tp), where
        assert r["pad_columns_all_min"], f"{where}: pad columns not masked (max {r['pad_max']})"
    check(records, cases, tp, f"TP {tp}, vocab 262, on-device sampling (sharded logits), {release}", sim_report)


# --------------------------------------------------------------------------------------------- on-device sampling
def ods_main(argv: list[str]) -> None:
    """NxDI CPU mode with on-device sampling (the LM head keeps its logits sharded) and output_logits. The tokens are
    chosen here by argmax over the gathered logits (NxDI's CPU-mode sampler takes each rank's local argmax)."""
    import os
    from pathlib import Path

    import standins  # installed by test/sim/standins/sitecustomize.py
    import torch
    from nxdi_cpu_driver import free_port, generate
    from sim_golden import compare, load_golden

    from nxdi_gemma.neuron import runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("--ods", action="store_true")
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--neuron-config", default="{}", help="extra NeuronConfig fields, JSON")
    parser.add_argument("case")
    args = parser.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    records = []
    golden = load_golden(args.case)
    vocab = golden.logits[0].shape[-1]
    seq_len = -(-(max(map(len, golden.prompts)) + golden.new_tokens) // 64) * 64
    settings = dict(tp_degree=args.tp, batch_size=1, seq_len=seq_len, max_context_length=seq_len,
                    torch_dtype="float32", output_logits=True, on_device_sampling_config={"do_sample": False, "top_k": 1},
                    **json.loads(args.neuron_config))
    model = runtime.build(str(golden.ckpt), settings, on_cpu=True)
    model.to_cpu()
    for i, prompt in enumerate(golden.prompts):
        mark = standins.mark()
        tokens, logits = generate(model, prompt, golden.new_tokens)
        pads = logits[:, vocab:]
        record = compare(golden, i, tokens, logits[:, :vocab])
        record.update(case=golden.name, prompt=i, tp=args.tp, bound=golden.bound, tokens=tokens,
                      golden_tokens=golden.tokens[i], standins_called=standins.calls(since=mark),
                      width=logits.shape[-1], pad_max=pads.max().item() if pads.numel() else None,
                      pad_columns_all_min=bool((pads == torch.finfo(pads.dtype).min).all()) and pads.numel() > 0)
        records.append(record)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    ods_main(sys.argv[1:])
