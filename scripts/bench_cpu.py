"""Tokens/s of our CPU runtime vs Hugging Face transformers: same checkpoint, same prompts, greedy, one run.

    python scripts/bench_cpu.py                                  # gemma-3-1b geometry, 6 layers, vocab 32768
    python scripts/bench_cpu.py --shape gemma-4-e2b --layers 5
    python scripts/bench_cpu.py --model DIR                      # a checkpoint on disk
"""

import argparse
import tempfile
from pathlib import Path

import torch

from nxdi_gemma.benchmark import cpu_vs_hf, shrunk_config
from nxdi_gemma.checkpoint import save_checkpoint
from nxdi_gemma.public_models import PUBLIC_CONFIGS, public_config
from nxdi_gemma.tiny import random_weights

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="checkpoint directory (default: random weights with --shape's geometry)")
parser.add_argument("--shape", default="gemma-3-1b", choices=sorted(PUBLIC_CONFIGS))
parser.add_argument("--layers", type=int, default=6)
parser.add_argument("--vocab", type=int, default=32768)
parser.add_argument("--prompt-len", type=int, default=64)
parser.add_argument("--prompts", type=int, default=4)
parser.add_argument("--max-new-tokens", type=int, default=64)
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
args = parser.parse_args()
torch.set_num_threads(torch.get_num_threads())

with tempfile.TemporaryDirectory() as tmp:
    model = args.model
    if model is None:
        config = shrunk_config(public_config(args.shape), args.layers, args.vocab)
        model = str(save_checkpoint(Path(tmp) / "bench", config, random_weights(config, seed=0)))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    result = cpu_vs_hf(model, prompts, args.max_new_tokens, getattr(torch, args.dtype))

source = args.model or f"{args.shape} geometry, {args.layers} layers, vocab {args.vocab}, random weights"
print(f"checkpoint: {source}")
print(f"{args.prompts} prompts x {args.prompt_len} tokens, {args.max_new_tokens} new tokens each, greedy, {args.dtype}, "
      f"{torch.get_num_threads()} threads")
print(f"ours: {result.ours_tokens_per_s:8.1f} tokens/s")
print(f"HF:   {result.hf_tokens_per_s:8.1f} tokens/s")
print(f"ratio ours/HF: {result.ratio:.2f}")
