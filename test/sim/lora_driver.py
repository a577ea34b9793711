"""Multi-LoRA in NxDI's CPU mode: our NxDI class with NxDI's LoRA serving (modules/lora_serving, static adapters),
several adapters and the base model in one batch, against HF with each adapter merged by PEFT.

    python lora_driver.py --out RESULT.json CASE_DIR

Run with the tier's CPU-mode environment (conftest `sim.env(release, "cpu")`). CASE_DIR holds a golden made with
"adapters" (make_goldens.py). The model gets `lora_config` = {max_loras: adapters + 1, lora_ckpt_paths: every
adapter}: NxDI zero-fills the LoRA weight slots no adapter occupies, so the last slot is the base model. Every prompt
runs as one batch with one row per adapter plus one base row (static batching, seq_ids 0..n, `adapter_ids` the slot
of each row), prefill then one token per step. Rank 0 writes, per prompt and row, the tokens and the comparison with
the golden of that row's adapter (the base row: the plain golden).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from nxdi_cpu_driver import prepare_process
from sim_golden import compare, load_golden

BUCKET = 64


@torch.inference_mode()
def generate(model, prompt: list[int], rows: int, slots: list[int], new_tokens: int) -> tuple[list, list]:
    """Greedy tokens and logits per row: the same prompt in every row, row r served by adapter slot slots[r]."""
    model.reset()
    ids = torch.tensor([prompt] * rows)
    positions = torch.arange(len(prompt))[None].repeat(rows, 1)
    mask = torch.ones_like(ids)
    seq_ids, adapter_ids = torch.arange(rows), torch.tensor(slots, dtype=torch.int32)
    tokens, logits = [[] for _ in range(rows)], [[] for _ in range(rows)]
    for step in range(new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, seq_ids=seq_ids,
                    adapter_ids=adapter_ids)
        for r in range(rows):
            last = out.logits[r, -1].float()
            logits[r].append(last)
            tokens[r].append(int(last.argmax()))
        ids = torch.tensor([[t[-1]] for t in tokens])
        positions = torch.full((rows, 1), len(prompt) + step)
        mask = torch.ones(rows, len(prompt) + step, dtype=torch.long)
    return tokens, [torch.stack(x) for x in logits]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("case")
    args = parser.parse_args()
    prepare_process()
    import standins  # installed by test/sim/standins/sitecustomize.py

    from nxdi_gemma.neuron import runtime

    case = Path(args.case)
    golden = load_golden(case)
    adapters = json.loads((case / "golden.json").read_text())["adapters"]
    names = sorted(adapters)
    rows = len(names) + 1
    seq_len = -(-(max(map(len, golden.prompts)) + golden.new_tokens) // BUCKET) * BUCKET
    lora = {"max_loras": rows, "max_lora_rank": max(a["rank"] for a in adapters.values()), "batch_size": rows,
            "lora_ckpt_paths": {name: str(case / adapters[name]["dir"]) for name in names}}
    settings = {"tp_degree": 1, "batch_size": rows, "ctx_batch_size": rows, "seq_len": seq_len,
                "max_context_length": seq_len, "torch_dtype": "float32", "lora_config": lora}
    model = runtime.build(str(golden.ckpt), settings, on_cpu=True)
    model.to_cpu()
    slots = list(range(rows))  # adapter i (sorted names) in slot i, the base model in the zero slot rows - 1
    records = []
    for i, prompt in enumerate(golden.prompts):
        mark = standins.mark()
        tokens, logits = generate(model, prompt, rows, slots, golden.new_tokens)
        for r in range(rows):
            name = names[r] if r < len(names) else None
            want = golden if name is None else _adapter_golden(golden, adapters[name])
            record = compare(want, i, tokens[r], logits[r])
            record.update(prompt=i, adapter=name, tokens=tokens[r], golden_tokens=want.tokens[i],
                          standins_called=standins.calls(since=mark))
            records.append(record)
            print(f"lora_driver: prompt {i} adapter {name}: match {record['match']:.3f} "
                  f"max|dlogit| {record['max_abs_logit_diff']:.1e}", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


def _adapter_golden(golden, adapter: dict):
    from dataclasses import replace

    return replace(golden, tokens=adapter["tokens"],
                   logits=[torch.tensor(x, dtype=torch.float32) for x in adapter["logits"]])


if __name__ == "__main__":
    main()
