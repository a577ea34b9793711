"""Block KV layout + prefix caching, the way vllm-neuron 0.4.1 / 0.5.0 drive NxDI's block-KV path, in NxDI's CPU
mode.

    python prefix_cache_driver.py --tp 1 --out RESULT.json CASE_DIR...
    python -m torch.distributed.run --nproc_per_node 2 --master_port P prefix_cache_driver.py --tp 2 ...

For each golden case, a model with is_block_kv_layout + is_prefix_caching (block size 8 = the fixtures' window,
continuous batching, 3 rows, 2-D prefill x prefix buckets), fed what vllm-neuron's model runner sends
(`_process_new_request_for_continuous_batching_with_prefix_caching` and the cached-request variant): the whole
prompt with positions, the block table padded with block 0, the slot mapping from the first uncomputed token
(padded with -1), full and computed context lengths, no attention mask. Requests:
  A: prompt 0 (30 tokens, computed 0) in row 0; B: prompt 1 (5 tokens) in row 1; A and B decode 4 steps together;
  C: prompt 0 again in row 2, its first 3 blocks (24 tokens, 3 windows) A's own blocks, computed 24: NxDI's bucket
  choice recomputes part of the prefix (the chunk starts mid-block) and reads the rest from A's blocks;
  then A, B, C decode together to the end. Every request's tokens and logits are compared with its HF golden.
Rank 0 writes one JSON record per request, with the prompt tokens that reached the model in its prefill.

Rows are 0, 1, 2 in arrival order: with prefix caching, NxDI's ModelWrapper (0.8 and 0.9) pads a partial decode
batch without sorting and on Neuron returns the first rows' logits, but in CPU mode it index-selects the padded
logits by seq_ids, which is right only when the decoding rows are 0 .. n-1 (a CPU-mode artefact of NxDI).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import standins  # installed by test/sim/standins/sitecustomize.py
import torch
from nxdi_cpu_driver import BUCKET, prepare_process
from sim_golden import compare, load_golden

BLOCK = 8


class Request:
    def __init__(self, name: str, prompt: list[int], golden_index: int, row: int, blocks: list[int]):
        self.name, self.prompt, self.golden_index, self.row, self.blocks = name, prompt, golden_index, row, blocks
        self.tokens: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.fed = 0

    def slot(self, position: int) -> int:
        return self.blocks[position // BLOCK] * BLOCK + position % BLOCK


def settings(golden, tp: int) -> dict:
    """The neuron config: block layout + prefix caching, block size 8, 3 rows, 2-D prefill x prefix buckets."""
    max_len = -(-(max(map(len, golden.prompts)) + golden.new_tokens) // BUCKET) * BUCKET
    rows = 3
    return dict(tp_degree=tp, batch_size=rows, ctx_batch_size=1, tkg_batch_size=rows, seq_len=max_len,
                max_context_length=max_len, torch_dtype=golden.dtype, is_continuous_batching=True,
                enable_bucketing=True, is_block_kv_layout=True, is_prefix_caching=True, pa_block_size=BLOCK,
                pa_num_blocks=rows * (max_len // BLOCK) + 1, context_encoding_buckets=[16, max_len],
                prefix_buckets=[32, max_len], token_generation_buckets=[max_len])


@torch.inference_mode()
def run_case(golden, tp: int) -> list[dict]:
    """The requests in NxDI's CPU mode."""
    from nxdi_gemma.neuron import runtime

    model = runtime.build(str(golden.ckpt), settings(golden, tp), on_cpu=True)
    model.to_cpu()
    fed: list[int] = []
    inner = model.context_encoding_model.model  # the NeuronGemmaModel, called with the bucket-padded inputs
    original = inner.forward

    def counting(input_ids, attention_mask, position_ids, *args, **kwargs):
        fed.append(chunk_tokens(position_ids))
        return original(input_ids, attention_mask, position_ids, *args, **kwargs)

    inner.forward = counting  # a test probe: counts the prompt tokens that reach the context-encoding model
    return requests(model, golden, tp, fed)


def chunk_tokens(position_ids: torch.Tensor) -> int:
    """The real tokens of a bucket-padded prefill chunk: positions p0 .. L-1, then padding (position 1)."""
    return int((position_ids.amax(dim=1) - position_ids[:, 0] + 1).sum())


def requests(model, golden, tp: int, fed: list[int]) -> list[dict]:
    """Requests A, B, C (module docstring) through `model` (NxDI's CPU mode, or the XLA tier's replayed graphs),
    scored against the golden; `fed` is filled with the prompt tokens of each context-encoding call."""
    config = settings(golden, tp)
    max_len, rows = config["seq_len"], config["batch_size"]
    per_seq = max_len // BLOCK
    from neuronx_distributed_inference.modules.generation.sampling import prepare_sampling_params

    model.reset()
    mark = standins.mark()
    free = list(range(1, rows * per_seq + 1))  # block 0 is vLLM's null block

    def take(n: int) -> list[int]:
        return [free.pop(0) for _ in range(n)]

    def table(req: Request) -> list[int]:
        return req.blocks + [0] * (per_seq - len(req.blocks))

    def prefill(req: Request, computed: int) -> None:
        n = len(req.prompt)
        before = len(fed)
        out = model(input_ids=torch.tensor([req.prompt]), attention_mask=None,
                    position_ids=torch.arange(n)[None], seq_ids=torch.tensor([req.row]),
                    sampling_params=prepare_sampling_params(1),
                    block_table=torch.tensor([table(req)]),
                    slot_mapping=torch.tensor([[req.slot(i) if i < n else -1 for i in range(computed, max_len)]]),
                    full_context_lens=torch.tensor([[n]]), computed_context_lens=torch.tensor([[computed]]))
        req.fed = sum(fed[before:])
        req.logits.append(out.logits[0, -1].float())
        req.tokens.append(int(req.logits[-1].argmax()))

    def decode(active: list[Request]) -> None:
        active = sorted(active, key=lambda r: r.row)
        pos = [len(r.prompt) + len(r.tokens) - 1 for r in active]
        out = model(input_ids=torch.tensor([[r.tokens[-1]] for r in active]), attention_mask=None,
                    position_ids=torch.tensor([[p] for p in pos]), seq_ids=torch.tensor([r.row for r in active]),
                    sampling_params=prepare_sampling_params(len(active)),
                    block_table=torch.tensor([table(r) for r in active]),
                    slot_mapping=torch.tensor([[r.slot(p)] for r, p in zip(active, pos, strict=True)]),
                    full_context_lens=torch.tensor([[p + 1] for p in pos]),
                    computed_context_lens=torch.tensor([[p] for p in pos]))
        for j, r in enumerate(active):
            r.logits.append(out.logits[j, -1].float())
            r.tokens.append(int(r.logits[-1].argmax()))

    new = golden.new_tokens
    need = [-(-(len(p) + new) // BLOCK) for p in golden.prompts]
    a = Request("A", golden.prompts[0], 0, 0, take(need[0]))
    b = Request("B", golden.prompts[1], 1, 1, take(need[1]))
    prefill(a, 0)
    prefill(b, 0)
    for _ in range(4):
        decode([a, b])
    shared = len(a.prompt) // BLOCK  # the full blocks of A's prompt: what vLLM's prefix cache hands back
    c = Request("C", golden.prompts[0], 0, 2, a.blocks[:shared] + take(need[0] - shared))
    prefill(c, shared * BLOCK)
    while any(len(r.tokens) < new for r in (a, b, c)):
        decode([r for r in (a, b, c) if len(r.tokens) < new])
    called = standins.calls(since=mark)
    records = []
    for r in (a, b, c):
        record = compare(golden, r.golden_index, r.tokens, torch.stack(r.logits))
        record.update(case=golden.name, request=r.name, prompt=r.golden_index, prompt_len=len(r.prompt), tp=tp,
                      bound=golden.bound, tokens=r.tokens, golden_tokens=golden.tokens[r.golden_index],
                      prefill_tokens_fed=r.fed, standins_called=called)
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    rank = prepare_process()
    from neuronx_distributed.parallel_layers import parallel_state

    records = []
    for case_dir in args.cases:
        records.extend(run_case(load_golden(case_dir), args.tp))
        if rank == 0:
            Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
        if args.tp == 1:
            parallel_state.destroy_model_parallel()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
