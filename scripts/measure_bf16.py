"""Measure bfloat16 against Hugging Face bfloat16, per family and per path, and print (or write into README.md) the
table: greedy token match rate and max |logit diff| along the steps both sides computed from the same tokens.

    python scripts/measure_bf16.py [--write-readme] [--sim-python PY] [--nxdi-sources DIR] [--release sdk-2.28]
    python scripts/measure_bf16.py --families "Gemma 2" --json g2.json ...; python scripts/measure_bf16.py --merge \
        g2.json g3.json ... --write-readme        # the same table from runs made separately

Runs in the main environment (transformers >= 5: the HF reference, Gemma 4 included). Paths measured:
  cpu    our CPU runtime (`nxdi_gemma.cpu`), in this process;
  nxdi   our NxDI classes in NxDI's CPU mode at TP 1 (NxDI cannot run bf16 over gloo at TP > 1), in the simulation
         tier's interpreter (`--sim-python`, default $NXDI_GEMMA_SIM_PYTHON, else what scripts/sim_env.sh prints)
         with the tier's stand-ins (test/sim/standins) and the NxD/NxDI `src` trees of `--nxdi-sources/--release`;
  xla    the same classes traced once through NxD's ModelBuilder with real torch-xla and the graphs replayed on
         PJRT CPU (test/sim/xla), same interpreter;
  nxdi+acc, xla+acc   the same with the neuron config's `attention_fp32_accumulation` (the cache and active-token
         P @ V products summed in float32 and rounded once, as HF's single product is).
Fixtures (random weights, deterministic, `nxdi_gemma.tiny`): Gemma 2 (softcaps), Gemma 3, Gemma 4 dense (PLE, KV
sharing), Gemma 4 MoE (`make-tiny --kind gemma4`: PLE, KV sharing, K=V, MoE), Gemma 4 12B-like (`make-tiny --kind
gemma4_unified`: K=V global layers with one KV head); the 6 default prompts of
`token-match` (18 to 65 tokens, window 8) and 24 new tokens. The two sides exchange tokens and logits as
safetensors and JSON only. Float32 exactness is tested elsewhere; this only reports what bf16 gives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SECTION = "bf16-table"
PATHS = ("cpu", "nxdi", "xla", "nxdi+acc", "xla+acc")
# What a path adds to the neuron config of the NxDI worker it runs (its part before "+").
ACCUMULATION = {"attention_fp32_accumulation": True}
PATH_NEURON_CONFIG = {"nxdi+acc": ACCUMULATION, "xla+acc": ACCUMULATION}
# family label -> (tiny kind, config overrides)
FAMILIES = {
    "Gemma 2 (softcaps)": ("gemma2", {}),
    "Gemma 3": ("gemma3", {}),
    "Gemma 4 dense (PLE, KV sharing)": ("gemma4", {"enable_moe_block": False, "attention_k_eq_v": False}),
    "Gemma 4 MoE (PLE, KV sharing, K=V)": ("gemma4", {}),
    "Gemma 4 12B-like (K=V, 1 global KV head)": ("gemma4_unified", {}),
}


# ---------------------------------------------------------------------------------------------------------- worker
# Runs in the simulation tier's interpreter (NxD/NxDI importable, stand-ins installed by test/sim/standins).


def greedy_xla(model, prompt_ids: list[list[int]], new_tokens: int, standins) -> tuple[list, dict]:
    """Trace once, replay the graphs on PJRT CPU for every prompt (test/sim/xla's API). Stand-ins are called while
    tracing (our generate_hlo is served as torch-neuronx's); only calls while generating count."""
    from xla import replay

    from nxdi_gemma.reference import Continuation

    traced = replay.trace_model(model)
    session = replay.attach(model, traced, replay.sharded_weights(model))
    out = []
    mark = standins.mark()
    for ids in prompt_ids:
        tokens, logits = replay.greedy(model, torch.tensor([ids]), new_tokens)
        out.append(Continuation(tokens[0].tolist(), logits[0].float()))
    return out, {"weight_problems": session.weight_problems, "standins_called": standins.calls(since=mark)}


def worker(args: argparse.Namespace) -> int:
    import standins
    from safetensors.torch import save_file

    if args.worker == "xla":
        from xla import env

        env.install()
    from nxdi_gemma.neuron import runtime

    job = json.loads(Path(args.job).read_text())
    prompts, new = job["prompt_ids"], job["new_tokens"]
    longest = max(len(p) for p in prompts) + new
    seq_len = -(-longest // 64) * 64
    settings = {"tp_degree": 1, "batch_size": 1, "seq_len": seq_len, "max_context_length": seq_len,
                "torch_dtype": "bfloat16", **job["neuron_config"]}
    model = runtime.build(job["ckpt"], settings, on_cpu=args.worker == "nxdi")
    if args.worker == "nxdi":
        model.to_cpu()
        mark = standins.mark()
        conts = runtime.greedy(model, prompts, new)
        meta = {"standins_called": standins.calls(since=mark)}
    else:
        conts, meta = greedy_xla(model, prompts, new, standins)
    tensors = {}
    for i, c in enumerate(conts):
        tensors[f"tokens_{i}"] = torch.tensor(c.tokens, dtype=torch.int64)
        tensors[f"logits_{i}"] = c.logits.float().contiguous()
    save_file(tensors, args.out)
    Path(args.out + ".json").write_text(json.dumps(meta))
    return 0


# ------------------------------------------------------------------------------------------------------ measurement


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def sim_python(given: str | None) -> str:
    if given or os.environ.get("NXDI_GEMMA_SIM_PYTHON"):
        return given or os.environ["NXDI_GEMMA_SIM_PYTHON"]
    out = subprocess.run(["bash", str(REPO / "scripts" / "sim_env.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def make_fixture(root: Path, kind: str, overrides: dict) -> Path:
    from nxdi_gemma.checkpoint import save_checkpoint
    from nxdi_gemma.tiny import TINY_CONFIGS, byte_tokenizer_json, random_weights

    config = dict(TINY_CONFIGS[kind], **overrides)
    name = kind + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
    return save_checkpoint(root / name, config, random_weights(config), {"tokenizer.json": byte_tokenizer_json()})


def run_worker(path: str, python: str, ckpt: Path, prompt_ids: list[list[int]], new: int, work: Path,
               sources: Path) -> tuple[list, dict]:
    from safetensors.torch import load_file

    from nxdi_gemma.reference import Continuation

    job = work / f"job-{path}.json"
    job.write_text(json.dumps({"ckpt": str(ckpt), "prompt_ids": prompt_ids, "new_tokens": new,
                               "neuron_config": PATH_NEURON_CONFIG.get(path, {})}))
    out = work / f"out-{path}.safetensors"
    path = path.split("+")[0]  # the worker kind
    sim = REPO / "test" / "sim"
    env = dict(os.environ, NXDI_GEMMA_SIM_MODE="cpu" if path == "nxdi" else "xla",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), PYTHONPYCACHEPREFIX=str(work / "pycache"))
    env["PYTHONPATH"] = os.pathsep.join([
        str(sim / "standins"), str(sim), str(REPO / "src"),
        str(sources / "neuronx-distributed" / "src"), str(sources / "neuronx-distributed-inference" / "src"),
    ])
    cmd = [python, __file__, "--worker", path, "--job", str(job), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise SystemExit(f"{path} worker failed on {ckpt.name}:\n" + "\n".join(tail))
    tensors = load_file(str(out))
    conts = [Continuation(tensors[f"tokens_{i}"].tolist(), tensors[f"logits_{i}"]) for i in range(len(prompt_ids))]
    return conts, json.loads(Path(str(out) + ".json").read_text())


def summarize(results) -> dict:
    return {
        "match_rate": sum(r.match_rate for r in results) / len(results),
        "prompts_exact": sum(r.match_rate == 1.0 for r in results),
        "prompts": len(results),
        "max_abs_logit_diff": max(r.max_abs_logit_diff for r in results),
    }


def render(table: dict, meta: dict) -> str:
    heads = {"cpu": "CPU runtime", "nxdi": f"NxDI CPU mode, TP 1 ({meta['release']})",
             "xla": f"XLA replay, TP 1 ({meta['release']})",
             "nxdi+acc": "NxDI CPU mode, `attention_fp32_accumulation`", "xla+acc": "XLA replay, same"}
    paths = [p for p in PATHS if any(p in row for row in table.values())]
    lines = ["| fixture (random weights) | " + " | ".join(heads[p] for p in paths) + " |",
             "|---|" + "---|" * len(paths)]
    for family, row in table.items():
        cells = []
        for p in paths:
            r = row.get(p)
            cells.append("—" if r is None else f"{r['prompts_exact']}/{r['prompts']} prompts, "
                         f"{r['match_rate']:.0%} tokens, {r['max_abs_logit_diff']:.2g}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Each cell: prompts whose {meta['new_tokens']} greedy tokens all equal HF's, token match rate, max "
                 f"\\|logit diff\\| vs HF transformers {meta['transformers']} in bfloat16 (eager), over the steps "
                 f"both sides computed from the same tokens. `python scripts/measure_bf16.py --write-readme`; "
                 f"torch {meta['torch']} (HF, CPU runtime), {meta['sim_torch']} (NxDI, XLA).")
    return "\n".join(lines)


def meta_of(args: argparse.Namespace, sim_torch: str) -> dict:
    import transformers

    return {"release": args.release, "new_tokens": args.new_tokens, "transformers": transformers.__version__,
            "torch": torch.__version__, "sim_torch": sim_torch or "-"}


def write_readme(body: str) -> None:
    text = README.read_text()
    pattern = re.compile(rf"(<!-- BEGIN {SECTION} -->\n).*?(<!-- END {SECTION} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- BEGIN {SECTION} --> ... <!-- END {SECTION} --> section")
    README.write_text(pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=("nxdi", "xla"), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ", ".join(PATHS))
    p.add_argument("--families", default="", help="only families whose label contains one of these (comma list)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--sim-python", help="interpreter of the simulation tier (NxD/NxDI deps, torch-xla)")
    p.add_argument("--nxdi-sources", default=os.environ.get("NXDI_SOURCES", str(REPO.parent / "shared" / "nxdi-src")),
                   help="folder with <release>/neuronx-distributed(-inference)/src")
    p.add_argument("--release", default="sdk-2.28")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--write-readme", action="store_true", help=f"replace README.md's {SECTION} section")
    p.add_argument("--merge", nargs="+", help="no measuring: render the --json files of earlier runs as one table")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.merge:
        docs = [json.loads(Path(f).read_text()) for f in args.merge]
        table: dict = {}
        for doc in docs:
            for family, row in doc["table"].items():
                table.setdefault(family, {}).update(row)
        ordered = {f: table[f] for f in FAMILIES if f in table}
        meta = dict(docs[0]["meta"])
        meta["sim_torch"] = next((d["meta"]["sim_torch"] for d in docs if d["meta"]["sim_torch"] != "-"), "-")
        body = render(ordered, meta)
        print(body)
        if args.write_readme:
            write_readme(body)
        return 0

    from nxdi_gemma.cli import cpu_greedy
    from nxdi_gemma.reference import hf_greedy
    from nxdi_gemma.token_match import DEFAULT_PROMPTS, compare
    from nxdi_gemma.tokenizer import load_tokenizer, prompts_to_ids

    paths = [x for x in args.paths.split(",") if x]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths {unknown}: choose from {list(PATHS)}")
    sources = Path(args.nxdi_sources) / args.release
    python = sim_python(args.sim_python) if set(paths) - {"cpu"} else ""
    if python and not (sources / "neuronx-distributed-inference" / "src").is_dir():
        raise SystemExit(f"--nxdi-sources {args.nxdi_sources}: no {args.release}/neuronx-distributed-inference/src")
    sim_torch = ""
    if python:
        sim_torch = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], check=True,
                                   capture_output=True, text=True).stdout.strip()
    wanted = [w for w in args.families.split(",") if w]
    table: dict = {}
    with tempfile.TemporaryDirectory(prefix="nxdi-gemma-bf16-") as tmp:
        work = Path(tmp)
        for family, (kind, overrides) in FAMILIES.items():
            if wanted and not any(w in family for w in wanted):
                continue
            ckpt = make_fixture(work, kind, overrides)
            prompt_ids = prompts_to_ids(DEFAULT_PROMPTS, load_tokenizer(ckpt), "default prompts")
            refs = hf_greedy(ckpt, prompt_ids, args.new_tokens, torch.bfloat16)
            row = table.setdefault(family, {})
            for path in paths:
                meta: dict = {}
                if path == "cpu":
                    ours = cpu_greedy(str(ckpt), torch.bfloat16)(prompt_ids, args.new_tokens)
                else:
                    ours, meta = run_worker(path, python, ckpt, prompt_ids, args.new_tokens, work, sources)
                    if meta["standins_called"]:
                        raise SystemExit(f"{path} on {family}: closed-source stand-ins were called while "
                                         f"generating ({meta['standins_called'][:5]}): nothing is measured")
                results = [compare(ids, o, r) for ids, o, r in zip(prompt_ids, ours, refs, strict=True)]
                row[path] = summarize(results)
                r = row[path]
                print(f"{family:<36} {path:<8} {r['prompts_exact']}/{r['prompts']} prompts exact, match "
                      f"{r['match_rate']:.1%}, max |logit diff| {r['max_abs_logit_diff']:.3g}", flush=True)
                if args.json:  # after every cell, so a long run that stops keeps what it measured
                    Path(args.json).write_text(json.dumps({"meta": meta_of(args, sim_torch), "table": table}) + "\n")
    meta = meta_of(args, sim_torch)
    body = render(table, meta)
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "table": table}, indent=1) + "\n")
    if args.write_readme:
        write_readme(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
