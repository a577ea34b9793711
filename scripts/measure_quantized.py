"""Measure what quantized weights / KV cache cost in quality: greedy token match and max |logit diff| of int8 and
fp8 weights (per channel, `nxdi-gemma quantize`) and of an fp8 KV cache against the unquantized model, Hugging Face
transformers float32 on both sides, on real public geometries cut to a few layers (random weights, deterministic).

    python scripts/measure_quantized.py [--write-readme] [--json OUT]

Runs in the main environment. The quantized side is HF on the dequantized weights of our quantize step (and, for
the KV cache, HF whose cache rounds what it stores to fp8): the simulation tier shows our NxDI classes give those
references' tokens and logits within 1e-4 (test/sim/test_quantized.py), so these figures are the NxDI path's.
Random weights are not a trained model: a trained model's quality loss is its own to measure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "test" / "sim"))
README = REPO / "README.md"
SECTION = "quantized-table"
# label -> (public model, layers, overrides)
GEOMETRIES = {
    "Gemma 2 2B geometry, 2 layers": ("gemma-2-2b", 2, {}),
    "Gemma 3 1B geometry, 2 layers": ("gemma-3-1b", 2, {}),
    "Gemma 4 E2B geometry, 4 layers (PLE)": ("gemma-4-e2b", 4, {}),
    "Gemma 4 26B-A4B geometry, 2 layers, 16 experts": ("gemma-4-26b-a4b", 2, {"num_experts": 16}),
}
VOCAB, PROMPT_LENGTHS, NEW_TOKENS, SEED = 4096, [40, 12], 16, 0


def checkpoint(root: Path, name: str, layers: int, overrides: dict) -> Path:
    from nxdi_gemma.benchmark import shrunk_config
    from nxdi_gemma.checkpoint import save_checkpoint
    from nxdi_gemma.public_models import public_config
    from nxdi_gemma.tiny import random_weights

    config = shrunk_config(public_config(name), layers, VOCAB)
    if "text_config" in config:  # the text decoder alone, as a *ForCausalLM checkpoint (one naming for all sides)
        text = dict(config["text_config"])
        generation = text["model_type"].removesuffix("_text")
        config = dict(text, model_type=f"{generation}_text", architectures=[f"{generation.capitalize()}ForCausalLM"],
                      tie_word_embeddings=config.get("tie_word_embeddings", True))
    config.update(overrides)
    return save_checkpoint(root / name, config, random_weights(config, SEED))


def dequantized(src: Path, out: Path, dtype: str, lm_head: bool = False) -> Path:
    """The checkpoint with our quantize step's weights dequantized (q * scale) to float32; `lm_head`: the LM head
    quantized too (`quantize --lm-head`), saved as an untied lm_head.weight beside the unquantized embedding."""
    from safetensors import safe_open

    from nxdi_gemma.checkpoint import save_checkpoint
    from nxdi_gemma.config import read_config_json
    from nxdi_gemma.quantize import Scheme, quantize_checkpoint, scale_name

    tag = f"{dtype}-head" if lm_head else dtype
    qdir = quantize_checkpoint(src, out / f"q-{tag}", Scheme(dtype, "per_channel", lm_head=lm_head))
    tensors = {}
    with safe_open(str(qdir / "model.safetensors"), "pt") as f:
        quantized = [n for n in f.keys() if f.get_slice(n).get_dtype() in ("I8", "F8_E4M3")]  # noqa: SIM118
        scales = {scale_name(n) for n in quantized}
        for name in f.keys():  # noqa: SIM118
            if name in quantized:
                tensors[name] = f.get_tensor(name).float() * f.get_tensor(scale_name(name))
            elif name not in scales:
                tensors[name] = f.get_tensor(name)
    config = read_config_json(src)
    return save_checkpoint(out / f"deq-{tag}", dict(config, tie_word_embeddings=False) if lm_head else config,
                           tensors)


def score(ref, other) -> tuple[float, float]:
    tokens = matched = 0
    diff = 0.0
    for a, b in zip(ref, other, strict=True):
        same = [x == y for x, y in zip(a.tokens, b.tokens, strict=True)]
        steps = len(same) if all(same) else same.index(False) + 1
        diff = max(diff, (a.logits[:steps] - b.logits[:steps]).abs().max().item())
        tokens += len(same)
        matched += sum(same)
    return matched / tokens, diff


def measure() -> dict:
    from make_goldens import round_on_write_cache

    from nxdi_gemma.reference import hf_greedy

    results = {}
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label, (name, layers, overrides) in GEOMETRIES.items():
            ckpt = checkpoint(root, name, layers, overrides)
            base = hf_greedy(ckpt, prompts, NEW_TOKENS, torch.float32)
            row = {}
            for dtype in ("int8", "fp8"):
                row[f"{dtype} weights"] = score(base, hf_greedy(dequantized(ckpt, root / name, dtype), prompts,
                                                                NEW_TOKENS, torch.float32))
            for dtype in ("int8", "fp8"):
                row[f"{dtype} + LM head"] = score(base, hf_greedy(dequantized(ckpt, root / name, dtype, True),
                                                                  prompts, NEW_TOKENS, torch.float32))
            row["fp8 KV cache"] = score(base, hf_greedy(ckpt, prompts, NEW_TOKENS, torch.float32,
                                                        cache_class=round_on_write_cache(torch.float8_e4m3fn)))
            results[label] = row
            print(label, row, file=sys.stderr, flush=True)
    return results


def table(results: dict) -> str:
    columns = ["int8 weights", "fp8 weights", "int8 + LM head", "fp8 + LM head", "fp8 KV cache"]
    rows = ["| geometry (random weights) | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, row in results.items():
        rows.append(f"| {label} | " + " | ".join(f"{row[c][0]:.0%} tokens, {row[c][1]:.2g}" for c in columns) + " |")
    import transformers

    rows.append("")
    rows.append(f"Each cell: greedy token match with the unquantized model over {len(PROMPT_LENGTHS)} prompts "
                f"({' and '.join(map(str, PROMPT_LENGTHS))} tokens) x {NEW_TOKENS} new tokens, and max \\|logit diff\\| "
                f"over the steps both computed from the same tokens; HF transformers {transformers.__version__}, float32, "
                f"vocab {VOCAB}. `python scripts/measure_quantized.py --write-readme`.")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = measure()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    body = table(results)
    print(body)
    if args.write_readme:
        text = README.read_text()
        pattern = re.compile(rf"(<!-- BEGIN {SECTION} -->\n).*?(<!-- END {SECTION} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- BEGIN {SECTION} --> ... <!-- END {SECTION} --> section")
        README.write_text(pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
