"""`nxdi-gemma` command line. Bad input ends with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import GemmaPlan
from .errors import GemmaError, InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def model_dir(args: argparse.Namespace) -> Iterator[tuple[str, GemmaPlan]]:
    """--model, or the embedded default (a small random checkpoint created deterministically in a temp dir), with
    its plan. The directory is validated by our own loader from config.json and the safetensors headers before any
    command hands it to Hugging Face or NxDI, so a bad checkpoint is one line and no pickle file is ever opened."""
    from .checkpoint import check_checkpoint

    if args.model:
        yield args.model, check_checkpoint(args.model)
        return
    from .tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="nxdi-gemma-tiny-") as tmp:
        path = write_tiny_checkpoint(Path(tmp) / f"tiny-{args.tiny}", args.tiny)
        print(f"no --model given: using the embedded random tiny {args.tiny} checkpoint", file=sys.stderr)
        yield str(path), check_checkpoint(path)


def cpu_greedy(model_path: str, dtype: torch.dtype):
    from .cpu import generate, load_model
    from .reference import Continuation

    model = load_model(model_path, dtype)

    def greedy(prompt_ids: list[list[int]], max_new_tokens: int) -> list[Continuation]:
        out = []
        for ids in prompt_ids:
            g = generate(model, [ids], max_new_tokens, stop_on_eos=False, keep_logits=True)
            out.append(Continuation(g.tokens[0], g.logits[0]))
        return out

    return greedy


def cpu_speculative_greedy(model_path: str, draft_path: str, k: int, dtype: torch.dtype):
    """Greedy continuations of the target at model_path, decoded speculatively with the draft."""
    from . import speculation
    from .cpu import load_model
    from .reference import Continuation

    target = load_model(model_path, dtype)
    draft = speculation.load_draft(draft_path, target, dtype)

    def greedy(prompt_ids: list[list[int]], max_new_tokens: int) -> list[Continuation]:
        g = speculation.generate(target, draft, prompt_ids, max_new_tokens, k, stop_on_eos=False, keep_logits=True)
        print(f"speculation: K={k}, acceptance {g.acceptance_rate:.1%}, "
              f"{g.target_calls_per_token():.3f} target calls per token", file=sys.stderr)
        return [Continuation(t, lg) for t, lg in zip(g.tokens, g.logits, strict=True)]

    return greedy


def check_draft_args(args: argparse.Namespace, plan: GemmaPlan) -> None:
    """--draft / --num-speculative-tokens: refuse what cannot run, before any model is loaded."""
    from .speculation import check_draft_dir

    if args.draft is None:
        if args.num_speculative_tokens is not None:
            raise InputError("--num-speculative-tokens needs --draft DIR (the draft model's checkpoint)")
        return
    if args.backend != "cpu":
        raise InputError("--draft with --backend neuron is given at compile time: `nxdi-gemma compile --draft DIR "
                         "[--num-speculative-tokens K]`, then run the compiled directory without --draft")
    if getattr(args, "temperature", 0.0):
        raise InputError("--draft decodes greedily; drop --temperature")
    check_draft_dir(plan, args.draft, speculative_tokens(args))


def speculative_tokens(args: argparse.Namespace) -> int:
    return 4 if args.num_speculative_tokens is None else args.num_speculative_tokens


def neuron_greedy(model_path: str, compiled: str | None, dtype: torch.dtype):
    if not compiled:
        raise InputError("--backend neuron needs --compiled DIR (the output of `nxdi-gemma compile`)")
    from .neuron.runtime import neuron_greedy as make  # imports NxDI, with a clear error when it is missing

    return make(model_path, compiled, dtype)


def neuron_speculative(model_path: str, compiled: str | None):
    if not compiled:
        raise InputError("--backend neuron needs --compiled DIR (the output of `nxdi-gemma compile`)")
    from .neuron.runtime import neuron_speculative as make  # imports NxDI, with a clear error when it is missing

    return make(model_path, compiled)


def load_prompts(args: argparse.Namespace, path: str) -> tuple[list, list[list[int]]]:
    from .token_match import DEFAULT_PROMPTS, read_prompts
    from .tokenizer import load_tokenizer, prompts_to_ids

    prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    source = args.prompts or "default prompts"
    return prompts, prompts_to_ids(prompts, load_tokenizer(path), source)


def cmd_token_match(args: argparse.Namespace) -> int:
    from . import reference, token_match

    dtype = DTYPES[args.dtype]
    with model_dir(args) as (path, plan):
        check_draft_args(args, plan)
        if args.reference:
            golden, prompt_ids, refs = reference.read_golden(args.reference)
            prompts = [item["prompt"] for item in golden["prompts"]]
            ref_name = f"golden {args.reference} (transformers {golden.get('transformers')}, {golden.get('dtype')})"
        else:
            prompts, prompt_ids = load_prompts(args, path)
            _check_lengths(prompt_ids, args.max_new_tokens, plan.max_position_embeddings)
            refs = reference.hf_greedy(path, prompt_ids, args.max_new_tokens, dtype)
            ref_name = f"transformers {reference.import_transformers().__version__} (eager, {args.dtype})"
        if args.draft:
            ours = cpu_speculative_greedy(path, args.draft, speculative_tokens(args), dtype)
        elif args.backend == "cpu":
            ours = cpu_greedy(path, dtype)
        else:
            ours = neuron_greedy(path, args.compiled, dtype)
        report = token_match.run(prompts, prompt_ids, ours, refs, model=args.model or f"embedded tiny {args.tiny}",
                                 backend=args.backend, dtype=args.dtype, reference=ref_name)
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if args.min_match is not None:
        low = [i for i, p in enumerate(report.prompts) if p.match_rate < args.min_match]
        if low:
            print(f"prompts {low} fall below --min-match {args.min_match}", file=sys.stderr)
            return 1
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from . import reference

    dtype = DTYPES[args.dtype]
    with model_dir(args) as (path, _):
        prompts, prompt_ids = load_prompts(args, path)
        refs = reference.hf_greedy(path, prompt_ids, args.max_new_tokens, dtype)
        reference.write_golden(args.out, args.model or f"embedded tiny {args.tiny}", args.dtype, prompts,
                               prompt_ids, refs)
    print(f"wrote {args.out}: {len(prompts)} prompts x {args.max_new_tokens} tokens")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .cpu import SamplingParams, cut_after_eos, generate, load_model
    from .tokenizer import load_tokenizer, prompts_to_ids

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    if args.backend == "neuron" and sampling.temperature:
        raise InputError("generate --backend neuron decodes greedily; drop --temperature (sample with vLLM instead)")
    with model_dir(args) as (path, plan):
        check_draft_args(args, plan)
        tokenizer = load_tokenizer(path)
        prompts = [json.loads(p) if args.token_ids else p for p in args.prompt]
        ids = prompts_to_ids(prompts, tokenizer, "--prompt")
        _check_lengths(ids, args.max_new_tokens, args.max_seq_len or plan.max_position_embeddings)
        if args.backend == "neuron":
            speculative = neuron_speculative(path, args.compiled)
            if speculative is not None:  # compiled with --draft: NxDI fused speculation
                g = speculative(ids, args.max_new_tokens)
                tokens_per_prompt = [cut_after_eos(t, plan.eos_token_ids) for t in g.tokens]
                print(f"speculation (NxDI fused): acceptance {g.acceptance_rate:.1%}, "
                      f"{g.target_calls_per_token():.3f} fused calls per token", file=sys.stderr)
            else:
                continuations = neuron_greedy(path, args.compiled, DTYPES[args.dtype])(ids, args.max_new_tokens)
                tokens_per_prompt = [cut_after_eos(c.tokens, plan.eos_token_ids) for c in continuations]
        elif args.draft:
            from . import speculation

            target = load_model(path, DTYPES[args.dtype])
            g = speculation.generate(target, speculation.load_draft(args.draft, target, DTYPES[args.dtype]), ids,
                                     args.max_new_tokens, speculative_tokens(args), max_seq_len=args.max_seq_len)
            tokens_per_prompt = g.tokens
            print(f"speculation: K={speculative_tokens(args)}, acceptance {g.acceptance_rate:.1%}, "
                  f"{g.target_calls_per_token():.3f} target calls per token", file=sys.stderr)
        else:
            model = load_model(path, DTYPES[args.dtype])
            tokens_per_prompt = generate(model, ids, args.max_new_tokens, sampling, max_seq_len=args.max_seq_len).tokens
    for prompt, tokens in zip(prompts, tokens_per_prompt, strict=True):
        text = tokenizer.decode(tokens) if tokenizer else tokens
        print(json.dumps({"prompt": prompt, "completion": text, "tokens": tokens}))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from . import benchmark

    if args.max_new_tokens < 2 or args.prompt_len < 1 or args.runs < 1:
        raise InputError("benchmark needs --max-new-tokens >= 2, --prompt-len >= 1 and --runs >= 1")
    with model_dir(args) as (path, plan):
        check_draft_args(args, plan)
        if args.draft:
            summary = benchmark.cpu_speculative(path, args.draft, args.batch, args.prompt_len, args.max_new_tokens,
                                                args.runs, speculative_tokens(args), DTYPES[args.dtype])
            print(json.dumps(summary, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
            return 0
        if args.backend == "neuron":
            if not args.compiled:
                raise InputError("benchmark --backend neuron needs --compiled DIR (the output of `nxdi-gemma compile`)")
            report = benchmark.neuron_latency(path, args.compiled, args.prompt_len, args.max_new_tokens, args.runs)
            extra = {}
        else:
            report = benchmark.cpu_latency(path, args.batch, args.prompt_len, args.max_new_tokens, args.runs,
                                           DTYPES[args.dtype])
            prompts = [list(range(3, 3 + args.prompt_len))] * args.batch
            versus = benchmark.cpu_vs_hf(path, prompts, args.max_new_tokens, DTYPES[args.dtype])
            extra = {"vs_hf": {"ours_tokens_per_s": versus.ours_tokens_per_s,
                               "hf_tokens_per_s": versus.hf_tokens_per_s, "ratio": versus.ratio}}
    report.model = args.model or f"embedded tiny {args.tiny}"
    summary = {**report.summary(), **extra}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "token_latency_s": report.token_latency_s,
                                               "ttft_s": report.ttft_s}, indent=2) + "\n")
    if args.png:
        benchmark.write_chart(report, args.png)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .checkpoint import check_checkpoint
    from .neuron.runtime import compile_model, read_compile_config

    # The user's inputs (checkpoint, then compile config) are checked before NxDI is imported, so a bad checkpoint
    # is reported as such even on a machine without the Neuron SDK, and NxDI never opens a directory we refuse.
    plan = check_checkpoint(args.model, prequantized=True)
    spec = read_compile_config(args.config)
    nc = spec["neuron_config"]
    if not nc.get("quantized"):
        check_checkpoint(args.model)  # a pre-quantized FP8 checkpoint runs only with quantized weights: one line
    else:
        from .quantize import check_prequantized_scheme

        check_prequantized_scheme(args.model, nc.get("quantization_dtype", "int8"),
                                  nc.get("quantization_type", "per_channel_symmetric"))
    if args.draft is not None:
        from .speculation import check_draft_dir

        # A Gemma of the same vocabulary, or a Gemma 4 assistant for this target (neuron/assistant.py).
        check_draft_dir(plan, args.draft, speculative_tokens(args))
    elif args.num_speculative_tokens is not None:
        raise InputError("--num-speculative-tokens needs --draft DIR (the draft model's checkpoint)")
    print(compile_model(args.model, args.config, args.out, args.draft, speculative_tokens(args)))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import Scheme, quantize_checkpoint

    scheme = Scheme(args.dtype, args.scheme, tuple(args.modules_to_not_convert or ()), args.lm_head)
    print(quantize_checkpoint(args.model, args.out, scheme))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.out, args.kind, args.seed))
    return 0


def resolve_plan(model: str):
    """A checkpoint directory, or the name of a public checkpoint (planning before downloading)."""
    from .config import load_plan
    from .public_models import PUBLIC_CONFIGS, public_plan

    if model in PUBLIC_CONFIGS:
        return public_plan(model)
    if not Path(model).is_dir():
        raise InputError(f"--model {model!r} is neither a directory nor a public checkpoint ({', '.join(PUBLIC_CONFIGS)})")
    return load_plan(model)


def cmd_plan(args: argparse.Namespace) -> int:
    from . import planning

    if args.table:
        print(planning.instance_table(weights=args.weights, kv_cache=args.kv_cache,
                                      quantize_lm_head=args.quantize_lm_head))
        return 0
    if not args.model or not args.instance:
        raise InputError("plan needs --model DIR|NAME and --instance NAME (or --table)")
    plan = resolve_plan(args.model)
    if args.draft:
        from .speculation import check_draft

        draft = resolve_plan(args.draft)
        if args.acceptance is None:
            raise InputError("plan --draft needs --acceptance ALPHA (the draft's per-token acceptance rate, 0..1)")
        check_draft(plan, draft, args.num_speculative_tokens or 1)
        spec = planning.speculation_plan(plan, draft, args.instance, args.acceptance, args.num_speculative_tokens,
                                         args.tp, args.seq_len, args.dtype, weights=args.weights,
                                         kv_cache=args.kv_cache, quantize_lm_head=args.quantize_lm_head)
        print(json.dumps(dataclasses.asdict(spec) | {"speedup": spec.speedup}, indent=2) if args.json else
              f"{args.model} with draft {args.draft} on {args.instance}: K={spec.num_speculative_tokens}, "
              f"{spec.tokens_per_step:.2f} tokens per step at acceptance {spec.acceptance}, "
              f"{spec.speculative_tokens_per_s:.1f} tokens/s vs {spec.target_tokens_per_s:.1f} without "
              f"({spec.speedup:.2f}x, batch-1 roofline){'' if spec.fits else '; target + draft do NOT fit'}")
        return 0
    schemes = {"weights": args.weights, "kv_cache": args.kv_cache, "quantize_lm_head": args.quantize_lm_head}
    result = planning.memory_plan(plan, args.instance, args.tp, args.batch, args.seq_len, args.dtype, **schemes)
    context, batch = planning.largest_fit(plan, args.instance, result.tp, args.dtype, result.seq_len, **schemes)
    if args.json:
        print(json.dumps({**result.to_json(), "max_context_batch1": context, "max_batch": batch}, indent=2))
    else:
        print(planning.format_plan(result))
        print(f"  largest context at batch 1: {context} tokens; largest batch at {result.seq_len} tokens: {batch}")
    return 0


def _check_lengths(prompt_ids: list[list[int]], max_new_tokens: int, limit: int) -> None:
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > limit:
            raise InputError(
                f"prompt {i} has {len(ids)} tokens; with {max_new_tokens} new tokens that exceeds the maximum "
                f"sequence length {limit}; shorten it or lower --max-new-tokens"
            )


def _add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", help="draft checkpoint (a Gemma of the same vocabulary, or a Gemma 4 assistant for this target): "
                        "greedy speculative decoding, cpu backend")
    p.add_argument("--num-speculative-tokens", type=int,
                   help="draft tokens proposed per step, K (default 4; needs --draft)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: an embedded random tiny model)")
    p.add_argument("--tiny", default="gemma3", choices=["gemma2", "gemma3", "gemma4", "gemma4_unified"],
                   help="which embedded tiny model to use when --model is not given")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nxdi-gemma", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tm = sub.add_parser("token-match", help="compare greedy tokens and logits with Hugging Face transformers")
    _add_model_args(tm)
    tm.add_argument("--backend", default="cpu", choices=["cpu", "neuron"])
    tm.add_argument("--compiled", help="compiled artifacts directory (--backend neuron)")
    tm.add_argument("--max-new-tokens", type=int, default=32)
    tm.add_argument("--prompts", help="JSON list of prompts: strings or lists of token ids")
    tm.add_argument("--reference", help="golden file from `nxdi-gemma reference` instead of running HF here")
    tm.add_argument("--json", help="write the report as JSON to this file")
    tm.add_argument("--min-match", type=float, help="exit 1 when any prompt's match rate is below this")
    _add_draft_args(tm)
    tm.set_defaults(run=cmd_token_match)

    ref = sub.add_parser("reference", help="record HF greedy tokens and top logits to a golden JSON file")
    _add_model_args(ref)
    ref.add_argument("--out", required=True)
    ref.add_argument("--max-new-tokens", type=int, default=32)
    ref.add_argument("--prompts", help="JSON list of prompts: strings or lists of token ids")
    ref.set_defaults(run=cmd_reference)

    gen = sub.add_parser("generate", help="generate text with our runtime")
    _add_model_args(gen)
    gen.add_argument("--backend", default="cpu", choices=["cpu", "neuron"])
    gen.add_argument("--compiled", help="compiled artifacts directory (--backend neuron)")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch (left-padded)")
    gen.add_argument("--token-ids", action="store_true", help="each --prompt is a JSON list of token ids")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--max-seq-len", type=int, help="cap on prompt + new tokens (default: the model's maximum)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    _add_draft_args(gen)
    gen.set_defaults(run=cmd_generate)

    bench = sub.add_parser("benchmark", help="TTFT, per-token latency percentiles and throughput")
    _add_model_args(bench)
    bench.add_argument("--backend", default="cpu", choices=["cpu", "neuron"])
    bench.add_argument("--compiled", help="compiled artifacts directory (--backend neuron; batch = compiled batch)")
    bench.add_argument("--batch", type=int, default=1, help="batch size (cpu backend)")
    bench.add_argument("--prompt-len", type=int, default=64)
    bench.add_argument("--max-new-tokens", type=int, default=32)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--json", help="write the measurements as JSON")
    bench.add_argument("--png", help="write a latency chart (needs matplotlib)")
    _add_draft_args(bench)
    bench.set_defaults(run=cmd_benchmark)

    comp = sub.add_parser("compile", help="trace and compile a checkpoint for Neuron (needs the Neuron SDK)")
    comp.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    comp.add_argument("--config", required=True, help="a compile config, e.g. compile_configs/gemma-3-1b__inf2.xlarge.json")
    comp.add_argument("--out", required=True, help="new directory for the compiled artifacts (written atomically)")
    comp.add_argument("--draft", help="draft checkpoint (a Gemma of the same vocabulary): compile NxDI fused "
                                      "speculation (greedy; continuous batching, one row per prompt)")
    comp.add_argument("--num-speculative-tokens", type=int, help="draft tokens proposed per step, K (default 4)")
    comp.set_defaults(run=cmd_compile)

    pl = sub.add_parser("plan", help="per-core memory and roofline speed of a model on a Neuron instance")
    pl.add_argument("--model", help="checkpoint directory or public checkpoint name (e.g. gemma-3-27b)")
    pl.add_argument("--instance", help="e.g. trn1.32xlarge, inf2.xlarge, trn2.3xlarge")
    pl.add_argument("--tp", type=int, help="tensor-parallel degree (default: the largest that fits the instance)")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--seq-len", type=int, help="context length (default: min(model maximum, 8192))")
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    pl.add_argument("--weights", default="model", choices=["model", "int8", "fp8"],
                    help="quantized weights (neuron config quantized=true); default: the model dtype")
    pl.add_argument("--kv-cache", default="model", choices=["model", "fp8"], help="fp8: kv_cache_quant=true")
    pl.add_argument("--quantize-lm-head", action="store_true",
                    help="with --weights int8/fp8: the LM head quantized too (neuron config quantize_lm_head=true)")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--table", action="store_true", help="print the README's instance table for all public models")
    pl.add_argument("--draft", help="draft checkpoint or public name: expected tokens/s with speculation")
    pl.add_argument("--acceptance", type=float, help="per-token acceptance rate of the draft, 0..1 (with --draft)")
    pl.add_argument("--num-speculative-tokens", type=int, help="K (default: the best K in 1..8)")
    pl.set_defaults(run=cmd_plan)

    qz = sub.add_parser("quantize", help="quantize a checkpoint's weights for NxDI (safetensors -> safetensors)")
    qz.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    qz.add_argument("--out", required=True, help="new directory (the neuron config's quantized_checkpoints_path)")
    qz.add_argument("--dtype", default="int8", choices=["int8", "fp8"], help="fp8 = e4m3 (Trn2)")
    qz.add_argument("--scheme", default="per_channel", choices=["per_channel", "per_tensor"])
    qz.add_argument("--modules-to-not-convert", nargs="*", metavar="PATH",
                    help="module paths kept in the model dtype (NxD's substring match, e.g. layers.0.mlp)")
    qz.add_argument("--lm-head", action="store_true",
                    help="quantize the LM head too (a tied head gets its own quantized copy; the embedding table "
                         "stays in the model dtype); serve with neuron config quantize_lm_head=true")
    qz.set_defaults(run=cmd_quantize)

    tiny = sub.add_parser("make-tiny", help="write a small random-weight Gemma checkpoint")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--kind", default="gemma3", choices=["gemma2", "gemma3", "gemma4", "gemma4_unified"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        print(f"error: --max-new-tokens {args.max_new_tokens} must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except GemmaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
