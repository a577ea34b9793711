"""The KV cache bytes our classes allocate in NxDI's CPU mode, next to the planner's figures for the same settings
(test_kv_bytes_as_built.py).

    python kv_bytes_driver.py --out RESULT.json CASE_DIR...

Per checkpoint, three builds at TP 1, float32, batch 2, seq_len 64: the contiguous layout with prompts in one
chunk, the contiguous layout with prefill chunks of 8 (full layers get spare slots), and the block layout of
prefix caching (block size 8, pa_num_blocks = batch x blocks per sequence). Built = the bytes of every tensor of the
model's KV manager (`kv_mgr.past_key_values`, what NxDI aliases as the cache state).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import standins  # noqa: F401  (installed by test/sim/standins/sitecustomize.py)
import torch
from nxdi_cpu_driver import prepare_process
from sim_golden import load_golden

BATCH, SEQ, CHUNK, BLOCK = 2, 64, 8, 8
SETTINGS = {
    "contiguous": {},
    "contiguous, chunks of 8": {"prefill_chunk_size": CHUNK},
    "block layout": {"is_block_kv_layout": True, "is_prefix_caching": True, "pa_block_size": BLOCK,
                     "pa_num_blocks": BATCH * SEQ // BLOCK, "is_continuous_batching": True, "ctx_batch_size": 1,
                     "enable_bucketing": True, "context_encoding_buckets": [16, SEQ], "prefix_buckets": [32, SEQ],
                     "token_generation_buckets": [SEQ]},
}


def measure(ckpt: str, name: str, extra: dict) -> dict:
    from neuronx_distributed.parallel_layers import parallel_state

    from nxdi_gemma import planning
    from nxdi_gemma.neuron import runtime

    model = runtime.build(ckpt, {"tp_degree": 1, "batch_size": BATCH, "seq_len": SEQ, "max_context_length": SEQ,
                                 "torch_dtype": "float32", **extra}, on_cpu=True)
    model.to_cpu()
    kv_mgr = model.context_encoding_model.model.kv_mgr
    built = sum(t.numel() * t.element_size() for t in kv_mgr.past_key_values)
    plan, nc = model.config.gemma_plan, model.config.neuron_config
    if nc.is_block_kv_layout:
        planned = planning.block_kv_cache_bytes(plan, 1, BATCH, SEQ, 4, nc.pa_block_size)
    else:
        planned = planning.kv_cache_bytes(plan, 1, BATCH, SEQ, 4, chunk=nc.prefill_chunk_size)
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {"case": Path(ckpt).parent.name, "settings": name, "built": built, "planned": planned,
            "prefill_chunk_size": nc.prefill_chunk_size, "producers": len(plan.kv_producers),
            "layers": plan.num_layers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    prepare_process()
    records = [measure(str(load_golden(case).ckpt), name, extra) for case in args.cases
               for name, extra in SETTINGS.items()]
    Path(args.out).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
