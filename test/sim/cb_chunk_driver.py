"""Continuous batching with chunked prefill, the way vllm-neuron drives our class, in NxDI's CPU mode.

    python cb_chunk_driver.py --chunk 7 --out RESULT.json CASE_DIR...

For each golden case: a model with is_continuous_batching, one KV-cache row per prompt, context encoding of batch 1
and a small `prefill_chunk_size`, so every prompt longer than the chunk is prefilled as several chunks through the
one context-encoding graph, each chunk reading the cache rows the previous chunks wrote. Prompts are prefilled one
at a time into rows in reverse order (row i gets prompt n-1-i), with positions only (no attention mask, as
vllm-neuron passes them); then all rows decode together, each at its own position. Every prompt's tokens and
logits are compared with its HF golden. Rank 0 writes one JSON record per case and prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import standins  # installed by test/sim/standins/sitecustomize.py
import torch
from nxdi_cpu_driver import BUCKET, prepare_process
from sim_golden import compare, load_golden


@torch.inference_mode()
def run_case(golden, chunk: int) -> list[dict]:
    from nxdi_gemma.neuron import runtime

    prompts = golden.prompts
    rows = len(prompts)
    row_of = {i: rows - 1 - i for i in range(rows)}  # out of order on purpose
    seq_len = -(-(max(map(len, prompts)) + golden.new_tokens) // BUCKET) * BUCKET
    settings = dict(tp_degree=1, batch_size=rows, ctx_batch_size=1, tkg_batch_size=rows, seq_len=seq_len,
                    max_context_length=seq_len, torch_dtype="float32", is_continuous_batching=True,
                    prefill_chunk_size=chunk)
    model = runtime.build(str(golden.ckpt), settings, on_cpu=True)
    model.to_cpu()
    model.reset()
    mark = standins.mark()
    tokens = {i: [] for i in range(rows)}
    logits = {i: [] for i in range(rows)}
    for i, prompt in enumerate(prompts):
        out = model(input_ids=torch.tensor([prompt]), attention_mask=None,
                    position_ids=torch.arange(len(prompt))[None], seq_ids=torch.tensor([row_of[i]]))
        logits[i].append(out.logits[0, -1].float())
        tokens[i].append(int(logits[i][-1].argmax()))
    by_row = sorted(range(rows), key=lambda i: row_of[i])  # prompt index of each row
    for step in range(golden.new_tokens - 1):
        positions = torch.tensor([[len(prompts[i]) + step] for i in by_row])
        mask = (torch.arange(int(positions.max()))[None, :] < positions).long()  # each row's cached tokens
        out = model(input_ids=torch.tensor([[tokens[i][-1]] for i in by_row]), attention_mask=mask,
                    position_ids=positions, seq_ids=torch.arange(rows))
        for row, i in enumerate(by_row):
            logits[i].append(out.logits[row, -1].float())
            tokens[i].append(int(logits[i][-1].argmax()))
    called = standins.calls(since=mark)
    records = []
    for i, prompt in enumerate(prompts):
        record = compare(golden, i, tokens[i], torch.stack(logits[i]))
        record.update(case=golden.name, prompt=i, prompt_len=len(prompt), row=row_of[i], chunk=chunk,
                      bound=golden.bound, tokens=tokens[i], golden_tokens=golden.tokens[i], standins_called=called)
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    prepare_process()
    from neuronx_distributed.parallel_layers import parallel_state

    records = []
    for case_dir in args.cases:
        records.extend(run_case(load_golden(case_dir), args.chunk))
        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
