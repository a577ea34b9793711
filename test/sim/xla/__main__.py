"""Trace our NxDI classes through NxD's ModelBuilder with real torch-xla, replay or compile the graphs, print figures.

    cd test/sim; PYTHONPATH=standins:$NXD_SRC:$NXDI_SRC NXDI_GEMMA_SIM_MODE=xla python -m xla --case CASE_DIR
    python -m xla --ckpt DIR [--golden GOLDEN.json] [--mode replay|trace|compile] [--tp 2 --mode trace]
    python -m xla --geometry gemma-3-1b --layers 2 --seq-len 4096 --mode compile --xla-dump DUMP

(`python test/sim/xla ...` works too.) Modes:
  trace    HLO statistics of every submodel and bucket only
  replay   + greedy generation through NxDI's host code with the graphs executed on PJRT CPU (default); with
           --case or --golden: token match and max |logit diff| vs Hugging Face; with --case and --draft: NxDI
           fused speculation (spec_driver.py's settings, one row per prompt) through runtime.speculative_greedy,
           tokens vs the golden
  compile  + XLA compiles every graph without running it (--xla-dump: buffer assignment, bytes accessed)
`--json OUT` writes everything printed. `python -m xla --jobs JOBS.json [--json OUT]` runs several argument lists
(a JSON list of lists) in one process. `--fast-compile`: XLA:CPU's backend optimization level 0 for the process.
Exit status 0 unless something could not run.
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


FAST_COMPILE = ("XLA:CPU backend optimization level 0 for the whole process (about half the compile time of a "
                "large graph; same HLO, slower execution): for replays of many small runs")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m xla", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--case", help="a simulation-tier golden case folder (ckpt/ + golden.json, made by "
                                    "test/sim/make_goldens.py): replayed against HF's tokens and logits")
    src.add_argument("--ckpt", help="checkpoint directory (config.json + safetensors)")
    src.add_argument("--geometry", help="a public model name (nxdi_gemma.public_models), cut to --layers; config "
                                        "only, so --mode trace|compile")
    p.add_argument("--nxdi", help="trace NxDI's own model class MODULE:CLASS (e.g. neuronx_distributed_inference."
                                  "models.llama.modeling_llama:NeuronLlamaForCausalLM) instead of ours, from --ckpt "
                                  "(its config.json, read by NxDI's load_pretrained_config); --mode trace only")
    p.add_argument("--draft", help="NxDI fused speculation with this draft: 'self' (the target's own checkpoint) or a "
                                   "checkpoint directory; with --speculation-length S = K + 1 (with --case: "
                                   "spec_driver.py's continuous-batching settings; with --nxdi: 'self' only)")
    p.add_argument("--speculation-length", type=int, default=0)
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
    p.add_argument("--graphs", default="", help="trace and compile only graphs whose name contains one of these "
                                                "(comma list, e.g. token_generation)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="with --case: the block KV layout + prefix caching settings and requests of "
                        "prefix_cache_driver.py (vllm-neuron's inputs), replayed against the golden")
    p.add_argument("--golden", help="HF golden in `nxdi-gemma reference` format (top-k logits), for --mode replay")
    p.add_argument("--prompt-len", type=int, default=24, help="without a golden: one seeded random prompt")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--xla-dump", help="folder for XLA's dump (compile mode)")
    p.add_argument("--json", help="write the reports (a JSON list) here")
    p.add_argument("--fast-compile", action="store_true", help=FAST_COMPILE)
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


def main(argv: list[str] | None = None) -> list[dict]:
    """One job from the command line, or several (`--jobs FILE`: a JSON list of argument lists) in one process,
    which saves the import of torch-xla, NxD and NxDI per job. `--json` gets the list of reports."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--jobs"]:
        outer = argparse.ArgumentParser(prog="python -m xla --jobs")
        outer.add_argument("--jobs", required=True)
        outer.add_argument("--json")
        outer.add_argument("--fast-compile", action="store_true", help=FAST_COMPILE)
        out = outer.parse_args(argv)
        jobs = [parse(a) for a in json.loads(Path(out.jobs).read_text())]
    else:
        jobs = [parse(argv)]
        out = jobs[0]
    dumps = {job.xla_dump for job in jobs if job.mode == "compile" and job.xla_dump}
    if len(dumps) > 1:
        raise SystemExit("one --xla-dump folder per process (XLA reads its flags once)")
    from . import env

    for folder in dumps:
        Path(folder).mkdir(parents=True, exist_ok=True)
    standins = env.install(next(iter(dumps), None), fast_compile=out.fast_compile)
    reports = []
    for job in jobs:
        reports.append(run(job, standins))
        if out.json:  # after every job, so a crash later leaves the earlier figures
            Path(out.json).write_text(json.dumps(reports, indent=1, default=str))
    return reports


def run(args: argparse.Namespace, standins) -> dict:

    from nxdi_gemma.neuron import runtime

    from . import replay, stats

    ckpt = Path(args.ckpt) if args.ckpt else Path(args.case) / "ckpt" if args.case else geometry_checkpoint(args.geometry, args.layers, args.vocab,
                                                                 json.loads(args.set))
    if args.geometry and args.mode == "replay":
        raise SystemExit("--geometry has no weights: use --mode trace or compile (or --ckpt for replay)")
    neuron_config = {"tp_degree": args.tp, "batch_size": args.batch, "seq_len": args.seq_len,
                     "max_context_length": args.ctx_len or args.seq_len, "torch_dtype": args.dtype,
                     **json.loads(args.neuron_config)}
    if args.prefix_caching:
        if not args.case:
            raise SystemExit("--prefix-caching needs --case (its requests are scored against the golden)")
        import prefix_cache_driver  # test/sim (the working directory of `python -m xla`)
        import sim_golden

        neuron_config = prefix_cache_driver.settings(sim_golden.load_golden(args.case), args.tp)
        args.seq_len = args.ctx_len = neuron_config["seq_len"]
    report: dict = {"ckpt": str(ckpt), "neuron_config": {k: str(v) for k, v in neuron_config.items()}, "graphs": {}}
    t0, mark = time.time(), standins.mark()
    if args.nxdi:
        if args.mode != "trace":
            raise SystemExit("--nxdi traces NxDI's own classes for their HLO: use --mode trace")
        if args.draft:
            if args.draft != "self" or args.speculation_length < 2:
                raise SystemExit("--nxdi with --draft: only 'self', with --speculation-length S = K + 1 >= 2")
            from neuronx_distributed_inference.models.config import OnDeviceSamplingConfig

            neuron_config.update(enable_fused_speculation=True, speculation_length=args.speculation_length,
                                 on_device_sampling_config=OnDeviceSamplingConfig(do_sample=False, top_k=1))
        model = nxdi_model(args.nxdi, ckpt, neuron_config, fused_self_draft=bool(args.draft))
    elif args.draft:
        if args.speculation_length < 2:
            raise SystemExit("--draft needs --speculation-length S = K + 1 >= 2")
        if args.case:
            # The NxDI CPU-mode speculation test's settings (spec_driver.py): continuous batching, one row per golden
            # prompt, each prefilled alone, one bucket holding prompt + new tokens + K.
            import sim_golden
            import spec_driver  # test/sim (the working directory of `python -m xla`)

            golden = sim_golden.load_golden(args.case)
            k = args.speculation_length - 1
            args.seq_len = args.ctx_len = spec_driver.seq_len_for(golden, k)
            neuron_config = spec_driver.settings(k, args.tp, len(golden.prompts), args.seq_len)
        else:
            # Fused speculation: greedy on-device sampling (NxDI's fused graph returns tokens), as vllm-neuron asks.
            from neuronx_distributed_inference.models.config import OnDeviceSamplingConfig

            neuron_config.update(enable_fused_speculation=True, speculation_length=args.speculation_length,
                                 on_device_sampling_config=OnDeviceSamplingConfig(do_sample=False, top_k=1))
        report["neuron_config"] = {k: str(v) for k, v in neuron_config.items()}
        model = runtime.build(str(ckpt), neuron_config, draft=str(ckpt) if args.draft == "self" else args.draft)
    else:
        model = runtime.build(str(ckpt), neuron_config)
    wanted = [w for w in args.graphs.split(",") if w]
    if wanted and args.mode == "replay":
        raise SystemExit("--graphs selects graphs to trace and compile; replay needs every graph")
    traced = replay.trace_model(model, [w.split("_bk")[0] for w in wanted])
    report["trace_seconds"] = round(time.time() - t0, 1)
    report["standins_called_while_tracing"] = standins.calls(since=mark)
    seq_lens = {args.seq_len, args.ctx_len or args.seq_len}
    for wrapper in model.models:
        for bucket in wrapper.neuron_config.buckets:
            seq_lens.update(bucket if isinstance(bucket, list) else [bucket])
    # A prompt chunk of C tokens attends the cache and itself: key axes of S + C are sequence lengths too.
    seq_lens |= {args.seq_len + b for b in seq_lens}
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
                xla["state_params"] = state_params
                report["graphs"][name]["xla"] = xla
                log(f"== {name} compiled in {xla['compile_seconds']}s: temp arena "
                    f"{xla.get('temp_arena_bytes', 0) / 2**20:.1f} MiB, bytes accessed "
                    f"{xla.get('bytes_accessed', 0) / 2**20:.1f} MiB; largest temp {xla.get('largest_temp_values', [])[:2]}")
    elif args.mode == "replay" and args.prefix_caching:
        report["replay"] = replay_prefix_caching(args, model, traced, standins)
    elif args.mode == "replay" and args.draft:
        if not args.case:
            raise SystemExit("--draft with --mode replay needs --case (the target's golden)")
        report["replay"] = replay_speculation(args, model, traced, standins)
    elif args.mode == "replay":
        report["replay"] = replay_prompts(args, model, traced, standins)
    return report


def nxdi_model(spec: str, ckpt: Path, neuron_config: dict, fused_self_draft: bool = False):
    """NxDI's own causal LM MODULE:CLASS built as NxDI's examples build it: its NeuronConfig class, its
    InferenceConfig class, and the checkpoint's config.json through NxDI's `load_pretrained_config`;
    `fused_self_draft`: fused speculation with the same checkpoint as draft, its config made as NxDI's
    inference_demo makes it (the target's neuron config with speculation off)."""
    import copy
    import importlib

    import torch
    from neuronx_distributed_inference.models.config import FusedSpecNeuronConfig
    from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config

    module, name = spec.split(":")
    cls = getattr(importlib.import_module(module), name)
    settings = dict(neuron_config, torch_dtype=getattr(torch, neuron_config["torch_dtype"]))
    config = cls.get_config_cls()(cls.get_neuron_config_cls()(**settings),
                                  load_config=load_pretrained_config(str(ckpt)))
    if fused_self_draft:
        draft_neuron_config = copy.deepcopy(config.neuron_config)
        draft_neuron_config.speculation_length = 0
        draft_neuron_config.enable_fused_speculation = False
        draft_config = cls.get_config_cls()(draft_neuron_config, load_config=load_pretrained_config(str(ckpt)))
        config.fused_spec_config = FusedSpecNeuronConfig(cls._model_cls, draft_config=draft_config,
                                                         draft_model_path=str(ckpt))
    return cls(str(ckpt), config)


def references(args: argparse.Namespace, vocab: int):
    """(prompts, reference tokens per prompt or None, comparer or None) from --case, --golden or a seeded prompt."""
    import torch

    if args.case:
        import sim_golden  # test/sim (the working directory of `python -m xla`)

        golden = sim_golden.load_golden(args.case)
        return golden.prompts, golden.new_tokens, lambda i, tokens, logits: sim_golden.compare(golden, i, tokens,
                                                                                                logits)
    if args.golden:
        from nxdi_gemma.reference import Continuation, read_golden
        from nxdi_gemma.token_match import compare

        _doc, prompts, refs = read_golden(args.golden)

        def score(i, tokens, logits):
            c = compare(prompts[i], Continuation(tokens, logits), refs[i])
            return {"match": c.match_rate, "first_divergence": c.first_divergence,
                    "max_abs_logit_diff": c.max_abs_logit_diff}

        return prompts, len(refs[0].tokens), score
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()], args.new_tokens, None


def replay_prompts(args: argparse.Namespace, model, traced, standins) -> dict:
    """Greedy generation of every prompt through NxDI's host code with the traced graphs replayed; counts XLA
    compiles and stand-in calls over the whole generation."""
    import torch

    from . import replay

    prompts, new_tokens, score = references(args, model.config.gemma_plan.vocab_size)
    session = replay.attach(model, traced, replay.sharded_weights(model))
    compiles0, mark, t1 = replay.xla_compiles(), standins.mark(), time.time()
    runs = []
    for i, prompt in enumerate(prompts):
        input_ids = torch.tensor([prompt] * args.batch)
        tokens, logits = replay.greedy(model, input_ids, new_tokens)
        run = {"prompt_len": len(prompt), "tokens": tokens[0].tolist()}
        if score is not None:
            run.update(score(i, tokens[0].tolist(), logits[0]))
        runs.append(run)
    result = {"prompts": runs, "xla_compiles": replay.xla_compiles() - compiles0, "compiled_at": session.compiled_at,
              "calls": dict(session.calls),
              "standins_called": standins.calls(since=mark), "weight_problems": session.weight_problems,
              "seconds": round(time.time() - t1, 1)}
    result["kv_state_effect"] = kv_state_effect(model, session, input_ids, tokens)
    if score is not None:
        result["token_match"] = min(r["match"] for r in runs)
        result["max_abs_logit_diff"] = max(r["max_abs_logit_diff"] for r in runs)
    log("RESULT replay", json.dumps(result))
    return result


def replay_prefix_caching(args: argparse.Namespace, model, traced, standins) -> dict:
    """prefix_cache_driver.py's requests (a prompt, a second one, the first again reusing its cached blocks, all
    decoding together) through NxDI's host code with the traced block-layout graphs replayed; one record per
    request (tokens and logits vs HF, prompt tokens that reached the context-encoding graphs)."""
    import prefix_cache_driver
    import sim_golden
    import torch

    from . import replay

    golden = sim_golden.load_golden(args.case)
    session = replay.attach(model, traced, replay.sharded_weights(model))
    fed: list[int] = []
    session.observers["context_encoding_model"] = lambda inputs: fed.append(
        prefix_cache_driver.chunk_tokens(inputs[2]))  # (input_ids, attention_mask, position_ids, ...)
    compiles0, t1 = replay.xla_compiles(), time.time()
    with torch.no_grad():  # not inference_mode: NxD's autograd Functions bump version counters
        records = prefix_cache_driver.requests(model, golden, args.tp, fed)
    result = {"records": records, "xla_compiles": replay.xla_compiles() - compiles0,
              "compiled_at": session.compiled_at, "calls": dict(session.calls),
              "weight_problems": session.weight_problems, "seconds": round(time.time() - t1, 1)}
    log("RESULT replay", json.dumps({k: v for k, v in result.items() if k != "records"}))
    return result


def replay_speculation(args: argparse.Namespace, model, traced, standins) -> dict:
    """NxDI fused speculation with the traced context-encoding and fused-speculation graphs replayed: every golden
    prompt in its own row of a continuously batched step, generated by `runtime.speculative_greedy` (what the CLI and
    spec_driver.py run: prefill per row, then one fused call per step for the whole batch, rows at different
    positions accepting different numbers of proposals). Tokens per row vs HF's greedy golden, fused calls,
    acceptance, XLA compiles and stand-ins called over the whole generation."""
    import sim_golden

    from nxdi_gemma.neuron import runtime

    from . import replay

    golden = sim_golden.load_golden(args.case)
    session = replay.attach(model, traced, replay.sharded_weights(model))
    compiles0, mark, t1 = replay.xla_compiles(), standins.mark(), time.time()
    out = runtime.speculative_greedy(model, golden.prompts, golden.new_tokens)  # under inference_mode
    result = {"tokens": out.tokens, "golden_tokens": golden.tokens, "prompt_lengths": [len(p) for p in golden.prompts],
              "identical": out.tokens == golden.tokens, "k": args.speculation_length - 1,
              "target_calls": out.target_calls, "calls_per_token": out.target_calls / (golden.new_tokens - 1),
              "acceptance": out.acceptance_rate, "xla_compiles": replay.xla_compiles() - compiles0,
              "compiled_at": session.compiled_at, "calls": dict(session.calls),
              "standins_called": standins.calls(since=mark), "weight_problems": session.weight_problems,
              "seconds": round(time.time() - t1, 1),
              "compile_seconds": {g: round(t, 1) for g, t in session.compile_seconds.items()}}
    log("RESULT replay", json.dumps({k: v for k, v in result.items() if "tokens" not in k}))
    return result


def kv_state_effect(model, session, input_ids, tokens) -> float:
    """Max |logit change| of one more decode step when the carried KV state is zeroed: > 0 shows the graphs read
    the state that earlier calls wrote through their aliased outputs (a graph that ignored it would give 0)."""
    import torch


    batch, prompt = input_ids.shape
    position = prompt + tokens.shape[1] - 1
    kwargs = dict(input_ids=tokens[:, -1:], attention_mask=torch.ones(batch, position, dtype=torch.long),
                  position_ids=torch.full((batch, 1), position), seq_ids=torch.arange(batch))
    saved = dict(session.state)
    with torch.no_grad():
        kept = model(**kwargs).logits[:, -1].float()
        session.state.update({name: torch.zeros_like(t) for name, t in saved.items()})
        zeroed = model(**kwargs).logits[:, -1].float()
    session.state.update(saved)
    return (kept - zeroed).abs().max().item()


if __name__ == "__main__":
    main()
