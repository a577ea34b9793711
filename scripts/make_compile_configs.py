"""Generate compile_configs/<model>__<instance>.json: one NxDI compile configuration per public checkpoint and
Neuron instance where it fits, chosen from `nxdi_gemma.planning` (never typed by hand).

    python scripts/make_compile_configs.py               # rewrite compile_configs/ (stale *__*.json are removed)
    python scripts/make_compile_configs.py --out DIR     # write elsewhere (the tests regenerate into a tmp dir)

Choice, per (model, instance):
- TP: the largest degree <= the instance's NeuronCores that splits the query heads, splits or replicates every layer
  type's KV heads (`planning.check_tp`) and divides the hidden size and every MLP / expert width (the NxDI classes
  shard all of them). More TP = more HBM and bandwidth per token; the heads cap it for the small models.
- seq_len: the longest of 32768 / 16384 / 8192 / 4096 / 2048 (capped by max_position_embeddings) whose batch-1 plan
  stays within FILL of the HBM per core; max_context_length = seq_len. Prompts run in chunks of
  `prefill_chunk_size` (planning.prefill_chunk: the context-encoding buckets stop there), so the context is bounded
  by the KV cache, not by S x S activations.
- batch: the largest power of two <= MAX_BATCH that stays within FILL at that seq_len.
- int8 weights (`<model>__<instance>__int8.json`, neuron config quantized=true, int8 per channel) where they change
  the fit: the model fits only with them, or with a longer seq_len or a larger batch.
FILL < 1 leaves headroom for what the estimate does not see (compiler scratch, fragmentation). A combination
with no such plan gets no file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nxdi_gemma.errors import InputError
from nxdi_gemma.planning import GIB, INSTANCES, MemoryPlan, check_tp, memory_plan, prefill_chunk
from nxdi_gemma.public_models import public_plan

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "compile_configs"

GEMMA_2_3_INSTANCES = (
    "trn1.2xlarge", "trn1.32xlarge", "inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge", "trn2.3xlarge",
)
# model -> instances to consider (issue 3: Gemma 2/3 everywhere; issue 4: the Gemma 4 targets).
TARGETS: dict[str, tuple[str, ...]] = {
    "gemma-2-2b": GEMMA_2_3_INSTANCES,
    "gemma-2-9b": GEMMA_2_3_INSTANCES,
    "gemma-2-27b": GEMMA_2_3_INSTANCES,
    "gemma-3-1b": GEMMA_2_3_INSTANCES,
    "gemma-3-4b": GEMMA_2_3_INSTANCES,
    "gemma-3-12b": GEMMA_2_3_INSTANCES,
    "gemma-3-27b": GEMMA_2_3_INSTANCES,
    "gemma-4-e2b": ("inf2.xlarge", "trn1.2xlarge"),
    "gemma-4-e4b": ("inf2.xlarge", "trn1.2xlarge"),
    "gemma-4-31b": ("trn1.32xlarge", "trn2.3xlarge", "inf2.48xlarge", "inf2.24xlarge"),
    "gemma-4-26b-a4b": ("trn1.32xlarge", "trn2.3xlarge"),
    "gemma-4-12b": GEMMA_2_3_INSTANCES,  # issue 16: the Gemma 4 that runs on one accelerator, everywhere it fits
}
SEQ_LENS = (32768, 16384, 8192, 4096, 2048)
MAX_BATCH = 4
FILL = 0.9  # share of the HBM per core a plan may use
MIN_BUCKET = 512
DTYPE = "bfloat16"
# int8 weights, per output channel (issue 18): a second file <model>__<instance>__int8.json where they change the fit.
QUANTIZED = {"quantized": True, "quantization_dtype": "int8", "quantization_type": "per_channel_symmetric"}


def file_name(model: str, instance: str, weights: str = "model") -> str:
    return f"{model}__{instance}.json" if weights == "model" else f"{model}__{instance}__{weights}.json"


def shardable_widths(plan) -> list[int]:
    """Dimensions the NxDI classes split over TP besides the heads: hidden (embedding), MLP and expert widths."""
    widths = {plan.hidden_size}
    for layer in plan.layers:
        widths.add(layer.intermediate_size)
        if layer.moe:
            widths.add(layer.moe.intermediate_size)
    return sorted(widths)


def valid_tps(plan, instance: str) -> list[int]:
    out = []
    for tp in range(1, INSTANCES[instance].cores + 1):
        try:
            check_tp(plan, tp)
        except InputError:
            continue
        if all(width % tp == 0 for width in shardable_widths(plan)):
            out.append(tp)
    return out


def within_fill(result: MemoryPlan) -> bool:
    return result.fits and result.total_per_core <= FILL * result.hbm_per_core


def buckets(limit: int) -> list[int]:
    """Powers of two from MIN_BUCKET up to `limit`, ending at `limit`."""
    out, b = [], MIN_BUCKET
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def choose(plan, instance: str, weights: str = "model") -> MemoryPlan | None:
    """The (TP, seq_len, batch) plan for one combination, or None when nothing fits within FILL."""
    tps = valid_tps(plan, instance)
    if not tps:
        return None
    tp = tps[-1]
    for seq_len in SEQ_LENS:
        if seq_len > plan.max_position_embeddings:
            continue
        best = None
        batch = 1
        while batch <= MAX_BATCH:
            result = memory_plan(plan, instance, tp, batch, seq_len, DTYPE, weights=weights)
            if not within_fill(result):
                break
            best = result
            batch *= 2
        if best is not None:
            return best
    return None


def notes(model: str, plan, chosen: MemoryPlan) -> str:
    inst = INSTANCES[chosen.instance]
    kv = sorted({layer.num_kv_heads for layer in plan.layers})
    head_dims = sorted({layer.head_dim for layer in plan.layers})
    seq_cap = min(SEQ_LENS[0], plan.max_position_embeddings)
    g = GIB
    text = (
        f"TP {chosen.tp}: the largest degree <= the {inst.cores} NeuronCores of {chosen.instance} that splits the "
        f"{plan.num_heads} query heads, splits or replicates the KV heads {kv} and divides the widths "
        f"{shardable_widths(plan)}. seq_len {chosen.seq_len}: the longest of {list(SEQ_LENS)} (capped at {seq_cap}) "
        f"within {FILL:.0%} of HBM per core at batch 1; batch {chosen.batch}: the largest power of two <= "
        f"{MAX_BATCH} within it. planning.memory_plan: {chosen.total_per_core / g:.2f} of "
        f"{chosen.hbm_per_core / g:.0f} GiB per core (weights {chosen.weights_per_core / g:.2f}, KV cache "
        f"{chosen.kv_cache_per_core / g:.2f}, activations {chosen.activations_per_core / g:.2f}, reserve "
        f"{chosen.reserve_per_core / g:.2f}). attn_kernel_enabled false: our attention core is plain torch "
        f"(head_dim {head_dims})."
    )
    if chosen.instance.startswith("trn2"):
        text += " logical_nc_config 2: TP counts logical NeuronCores (LNC=2)."
    return text


def better(quantized: MemoryPlan | None, unquantized: MemoryPlan | None) -> bool:
    """Whether int8 weights change the fit: the model fits only quantized, or with a longer context or batch."""
    return quantized is not None and (unquantized is None or (quantized.seq_len, quantized.batch) >
                                      (unquantized.seq_len, unquantized.batch))


def compile_config(model: str, instance: str, weights: str = "model") -> dict | None:
    plan = public_plan(model)
    chosen = choose(plan, instance, weights)
    if chosen is None:
        return None
    seq_len = chosen.seq_len
    context = seq_len
    chunk = prefill_chunk(plan, chosen.tp, chosen.batch, seq_len, context)
    neuron_config = {
        "tp_degree": chosen.tp,
        "batch_size": chosen.batch,
        "seq_len": seq_len,
        "max_context_length": context,
        "prefill_chunk_size": chunk,
        "torch_dtype": DTYPE,
        "enable_bucketing": True,
        "context_encoding_buckets": buckets(chunk),
        "token_generation_buckets": buckets(seq_len),
        "fused_qkv": True,
        "attn_kernel_enabled": False,
        "on_device_sampling_config": {"do_sample": False, "top_k": 1},
    }
    if instance.startswith("trn2"):
        neuron_config["logical_nc_config"] = 2
    text = notes(model, plan, chosen)
    if weights != "model":
        neuron_config.update(QUANTIZED)
        text += (" int8 weights (nxdi-gemma quantize's default scheme; the quantized checkpoint is written on first "
                 "use beside the compile output): this fit needs them, the bf16 weights "
                 + ("do not fit." if choose(plan, instance) is None else
                    f"fit only seq_len {choose(plan, instance).seq_len}, batch {choose(plan, instance).batch}."))
    return {"model": model, "instance": instance, "notes": text, "neuron_config": neuron_config}


def generate() -> dict[str, dict]:
    """file name -> config, for every target combination that fits."""
    out = {}
    for model, instances in TARGETS.items():
        for instance in instances:
            config = compile_config(model, instance)
            if config is not None:
                out[file_name(model, instance)] = config
            plan = public_plan(model)
            if better(choose(plan, instance, "int8"), choose(plan, instance)):
                out[file_name(model, instance, "int8")] = compile_config(model, instance, "int8")
    return out


def render(config: dict) -> str:
    return json.dumps(config, indent=2) + "\n"


def table(configs: dict[str, dict]) -> str:
    rows = ["| model | instance | TP | seq_len | batch | GiB per core |", "|---|---|---|---|---|---|"]
    for config in configs.values():
        nc = config["neuron_config"]
        weights = nc.get("quantization_dtype", "model")
        result = memory_plan(public_plan(config["model"]), config["instance"], nc["tp_degree"], nc["batch_size"],
                             nc["seq_len"], nc["torch_dtype"], weights=weights)
        rows.append(f"| {config['model']}{'' if weights == 'model' else ' (' + weights + ')'} | {config['instance']} "
                    f"| {nc['tp_degree']} | {nc['seq_len']} | {nc['batch_size']} | {result.total_per_core / GIB:.2f} of "
                    f"{result.hbm_per_core / GIB:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    parser.add_argument("--quiet", action="store_true", help="do not print the summary table")
    args = parser.parse_args(argv)
    configs = generate()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(args.out.glob("*__*.json")):
        if stale.name not in configs:
            stale.unlink()
    for name, config in configs.items():
        (args.out / name).write_text(render(config))
    if not args.quiet:
        print(table(configs))
        print(f"{len(configs)} configs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
