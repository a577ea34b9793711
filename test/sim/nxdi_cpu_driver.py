"""Run our NxDI class in NxDI's CPU mode on several golden cases in one process and compare with the HF goldens.

    python nxdi_cpu_driver.py --tp 1 --out RESULT.json CASE_DIR...
    python -m torch.distributed.run --nproc_per_node 2 --master_port P nxdi_cpu_driver.py --tp 2 --out ... CASE_DIR...

Run it with the environment `conftest.sim_env(release, "cpu")` gives (stand-ins, NxD/NxDI trees of one release, the
project). Each case is built with `runtime.build(..., on_cpu=True)` + `to_cpu()` and generated greedily through the
model's forward with the inputs vllm-neuron and `runtime.greedy` pass (NxDI's HuggingFaceGenerationAdapter is broken
in both released trees): prefill at positions 0..S-1, then one token per step. Rank 0 writes one JSON record per
case and prompt: token match, first divergence, max |logit diff| against the golden, the stand-ins called while
generating (must be none) and timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import standins  # installed by test/sim/standins/sitecustomize.py
import torch
from sim_golden import compare, load_golden

BUCKET = 64  # sequence lengths are rounded up to this (one context-encoding and one token-generation bucket)


@torch.inference_mode()
def generate(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    model.reset()
    ids = torch.tensor([prompt])
    positions = torch.arange(len(prompt))[None]
    mask = torch.ones_like(ids)
    tokens, logits = [], []
    for step in range(new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, seq_ids=torch.tensor([0]))
        last = out.logits[0, -1].float()
        logits.append(last)
        tokens.append(int(last.argmax()))
        ids = torch.tensor([[tokens[-1]]])
        positions = torch.tensor([[len(prompt) + step]])
        mask = torch.ones(1, len(prompt) + step, dtype=torch.long)  # the cached tokens; NxDI appends the active one
    return tokens, torch.stack(logits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_process() -> int:
    """Every NxDI CPU-mode driver's start: NxDI starts a gloo process group even at TP 1 (torchrun sets MASTER_ADDR/
    PORT for TP > 1); under torchrun NxDI's to_cpu() starts the group on every call, which fails for the second
    model of a process (and re-creating it hangs), so it is started once here and to_cpu() reuses it. Returns the
    rank."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
        del os.environ["WORLD_SIZE"]
    return int(os.environ.get("RANK", "0"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--neuron-config", default="{}", help="extra NeuronConfig fields, JSON")
    parser.add_argument("--quantized-dir", help="quantized weights: quantized_checkpoints_path = DIR/<case name>")
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    rank = prepare_process()

    records: list[dict] = []
    for case_dir in args.cases:
        golden = load_golden(case_dir)
        try:
            extra = json.loads(args.neuron_config)
            if args.quantized_dir:
                extra["quantized_checkpoints_path"] = str(Path(args.quantized_dir) / golden.name)
            records += run_case(golden, args.tp, extra, rank)
        except Exception as err:  # recorded, and failed by the test of that family; the other families still run
            lines = traceback.format_exception(err)
            records.append({"case": golden.name, "error": "".join(lines[-6:]).strip()})
            print(f"nxdi_cpu_driver: rank {rank}: {golden.name}: {records[-1]['error']}", file=sys.stderr, flush=True)
        if rank == 0:  # after every case, so a crash later keeps what was measured
            Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
        gc.collect()


def run_case(golden, tp: int, extra: dict, rank: int) -> list[dict]:
    from nxdi_gemma.neuron import runtime

    seq_len = -(-(max(map(len, golden.prompts)) + golden.new_tokens) // BUCKET) * BUCKET
    settings = {"tp_degree": tp, "batch_size": 1, "seq_len": seq_len, "max_context_length": seq_len,
                "torch_dtype": golden.dtype, **extra}
    start = time.perf_counter()
    model = runtime.build(str(golden.ckpt), settings, on_cpu=True)
    model.to_cpu()
    built = time.perf_counter()
    records = []
    # NxD's quantized layers in the model actually run (and what dtype their weights hold)
    quantized = sorted({f"{type(m).__name__}:{str(m.weight.dtype).removeprefix('torch.')}"
                        for m in model.models[0].model.modules() if type(m).__name__.startswith("Quantized")})
    # What NxDI's own swap on device (DecoderModelInstance.load_module -> NxD's convert, same selection rule: an
    # exact type of its mapping, path not containing a modules_to_not_convert entry) would still convert: nothing.
    left_for_nxdi = []
    if model.neuron_config.quantized:
        from neuronx_distributed.quantization.quantization_mappings import get_default_quant_module_mappings

        skip = model.neuron_config.modules_to_not_convert or []
        left_for_nxdi = [name for name, m in model.models[0].model.named_modules()
                         if type(m) in get_default_quant_module_mappings() and not any(k in name for k in skip)]
    for i, prompt in enumerate(golden.prompts):
        mark = standins.mark()
        t0 = time.perf_counter()
        tokens, logits = generate(model, prompt, golden.new_tokens)
        record = compare(golden, i, tokens, logits)
        record.update(case=golden.name, prompt=i, prompt_len=len(prompt), tp=tp, bound=golden.bound, tokens=tokens,
                      golden_tokens=golden.tokens[i], quantized_layers=quantized, left_for_nxdi_convert=left_for_nxdi,
                      standins_called=standins.calls(since=mark),
                      build_s=built - start, generate_s=time.perf_counter() - t0)
        records.append(record)
        if rank == 0:  # progress, for the test's failure output
            print(f"nxdi_cpu_driver: {golden.name} prompt {i}: match {record['match']:.3f} "
                  f"max|dlogit| {record['max_abs_logit_diff']:.1e}", file=sys.stderr, flush=True)
    return records

if __name__ == "__main__":
    main()
