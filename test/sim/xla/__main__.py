"""Trace our NxDI classes through NxD's ModelBuilder with real torch-xla, replay or compile the graphs, print figures.

    PYTHONPATH=test/sim:$NXD_SRC:$NXDI_SRC python -m xla --ckpt DIR [--golden GOLDEN.json] [--mode replay]
    python -m xla --geometry gemma-3-1b --layers 2 --seq-len 4096 --mode compile --xla-dump DUMP

(`python test/sim/xla ...` works too.) Modes:
  trace    HLO statistics of every submodel and bucket only
  replay   + greedy generation through NxDI's host code with the graphs executed on PJRT CPU (default); with
           --golden (a `nxdi-gemma reference` file) token match and max |logit diff| vs Hugging Face
  compile  + XLA compiles every graph without running it (--xla-dump: buffer assignment, bytes accessed)
`--json OUT` writes everything printed. Exit status 0 unless something could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python test/sim/xla`: import this folder as the package `xla`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "xla"  # noqa: A001


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m xla", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint directory (config.json + safetensors)")
    src.add_argument("--geometry", help="a public model name (nxdi_gemma.public_models), cut to --layers; config "
                                        "only, so --mode trace|compile")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--set", default="{}", help="JSON fields overriding the geometry's text config")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx-len", type=int, help="max_context_length (default: --seq-len)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--neuron-config", default="{}", help="more NeuronConfig fields, JSON")
    p.add_argument("--mode", choices=("trace", "replay", "compile"), default="replay")
    p.add_argument("--graphs", default="", help="compile only graphs whose name contains one of these (comma list)")
    p.add_argument("--golden", help="HF golden (nxdi-gemma reference format) for --mode replay")
    p.add_argument("--prompt-len", type=int, default=24, help="without --golden: a seeded random prompt")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--xla-dump", help="folder for XLA's dump (compile mode)")
    p.add_argument("--json", help="write the report here")
    return p.parse_args(argv)


def geometry_checkpoint(name: str, layers: int, vocab: int, overrides: dict) -> Path:
    """A config-only checkpoint of a public geometry cut to `layers` layers (tracing needs no weights)."""
    import tempfile

    from nxdi_gemma.benchmark import shrunk_config
    from nxdi_gemma.public_models import public_config

    config = shrunk_config(public_config(name), layers, vocab)
    text = config.get("text_config", config)
    text.update(overrides)
    out = Path(tempfile.mkdtemp(prefix="nxdi_gemma_geometry_"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def log(*parts) -> None:
    print(*parts, flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from . import env

    if args.xla_dump:
        Path(args.xla_dump).mkdir(parents=True, exist_ok=True)
    standins = env.install(args.xla_dump if args.mode == "compile" else None)

    import torch

    from nxdi_gemma.neuron import runtime

    from . import replay, stats

    ckpt = Path(args.ckpt) if args.ckpt else geometry_checkpoint(args.geometry, args.layers, args.vocab,
                                                                 json.loads(args.set))
    if args.geometry and args.mode == "replay":
        raise SystemExit("--geometry has no weights: use --mode trace or compile (or --ckpt for replay)")
    neuron_config = {"tp_degree": args.tp, "batch_size": args.batch, "seq_len": args.seq_len,
                     "max_context_length": args.ctx_len or args.seq_len, "torch_dtype": args.dtype,
                     **json.loads(args.neuron_config)}
    report: dict = {"ckpt": str(ckpt), "neuron_config": {k: str(v) for k, v in neuron_config.items()}, "graphs": {}}
    t0 = time.time()
    model = runtime.build(str(ckpt), neuron_config)
    traced = replay.trace_model(model)
    report["trace_seconds"] = round(time.time() - t0, 1)
    seq_lens = {args.seq_len, args.ctx_len or args.seq_len}
    for wrapper in model.models:
        for bucket in wrapper.neuron_config.buckets:
            seq_lens.update(bucket if isinstance(bucket, list) else [bucket])
    for tag, graphs in traced.items():
        for b, hlo in enumerate(graphs):
            name = f"{tag}_bk{b}"
            s = stats.hlo_stats(hlo, seq_lens)
            s["example_shapes"] = [list(x) for x in hlo.example_shapes]
            report["graphs"][name] = s
            log(f"== {name}: inputs {hlo.example_shapes}; {s['instructions']} HLO instructions; "
                f"dot FLOPs {s['dot_flops']:.3e}; params {s['param_bytes']}")
            log(f"   f64: {s['f64'][:3] or 'none'}; int64 S x S: {s['s64_seq_by_seq'][:3] or 'none'}")
            log(f"   largest: {s['largest_values'][:3]}")
            log(f"   collectives: {s['collectives'] or 'none'}")
            log(f"   host syncs / CPU fallbacks while tracing: {s['trace_host_syncs'] or 'none'}; "
                f"aliasing problems: {s['alias_problems'] or 'none'}")

    if args.mode == "compile":
        wanted = [w for w in args.graphs.split(",") if w]
        for tag, graphs in traced.items():
            for b, hlo in enumerate(graphs):
                name = f"{tag}_bk{b}"
                if wanted and not any(w in name for w in wanted):
                    continue
                before = set(Path(args.xla_dump).iterdir()) if args.xla_dump else set()
                t1 = time.time()
                state_params = replay.Graph(name, hlo, None).compile_only()
                new = sorted(set(Path(args.xla_dump).iterdir()) - before) if args.xla_dump else []
                xla = stats.xla_dump_stats(new, state_params)
                xla["compile_seconds"] = round(time.time() - t1, 1)
                report["graphs"][name]["xla"] = xla
                log(f"== {name} compiled in {xla['compile_seconds']}s: temp arena "
                    f"{xla.get('temp_arena_bytes', 0) / 2**20:.1f} MiB, bytes accessed "
                    f"{xla.get('bytes_accessed', 0) / 2**20:.1f} MiB; largest temp {xla.get('largest_temp_values', [])[:2]}")
    elif args.mode == "replay":
        from nxdi_gemma.reference import read_golden

        if args.golden:
            _doc, prompt_ids, refs = read_golden(args.golden)
            input_ids = torch.tensor(prompt_ids[:1])
            new_tokens = len(refs[0].tokens)
        else:
            vocab = model.config.gemma_plan.vocab_size
            input_ids = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1234))
            new_tokens, refs = args.new_tokens, None
        weights = replay.sharded_weights(model)
        session = replay.attach(model, traced, weights)
        compiles0, mark = replay.xla_compiles(), standins.mark()
        t1 = time.time()
        with replay.parallel_stage(replay.builder_of(model)):
            tokens, logits = replay.greedy(model, input_ids, new_tokens)
        result = {"tokens": tokens[0].tolist(), "xla_compiles": replay.xla_compiles() - compiles0,
                  "calls": dict(session.calls), "standins_called": standins.calls(since=mark),
                  "weight_problems": session.weight_problems, "seconds": round(time.time() - t1, 1)}
        if refs is not None:
            from nxdi_gemma.reference import Continuation
            from nxdi_gemma.token_match import compare

            cmp = compare(input_ids[0].tolist(), Continuation(tokens[0].tolist(), logits[0]), refs[0])
            result.update(reference_tokens=refs[0].tokens, token_match=cmp.match_rate, max_abs_logit_diff=cmp.max_abs_logit_diff)
        report["replay"] = result
        log("RESULT replay", json.dumps({k: v for k, v in result.items() if k != "reference_tokens"}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
