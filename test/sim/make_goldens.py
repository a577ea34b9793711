"""Make the simulation tier's checkpoints and Hugging Face goldens. Runs in the MAIN environment (transformers >= 5:
4.57, which the tier's venv pins for NxDI, has no Gemma 4 and misreads transformers-5 Gemma 3 configs).

    python test/sim/make_goldens.py SPEC.json OUT_DIR

SPEC.json maps a case name to {"config": config.json dict, "seed": int, "prompt_lengths": [int], "prompt_seed": int,
(optional "shared_prefix": int, the first tokens every prompt takes from prompt 0),
optional "hf_saved": true (the checkpoint re-saved by HF's own class `architectures[0]`, so a multimodal one also holds
the vision / audio tensors HF initializes, under the names HF saves them),
"new_tokens": int, optionally "dtype": "bfloat16", "adapters": {name: {"rank": int, "seed": int, "targets": [module
names]}}, "weights": "int8_rounded" (HF runs an int8-rounded copy of the checkpoint: the reference of quantized
weights; "int8_rounded_head": the same with the LM head rounded too, one scale per vocab row, as an untied head
beside the unrounded embedding table: the reference of `quantize_lm_head`; or "fp8_compressed_tensors": the checkpoint is an FP8 compressed-tensors one and HF runs its dequantized
weights) and "kv_cache": "f8e4m3" (HF's cache rounds what it stores to fp8: the reference of a quantized KV
cache), "assistant": {"seed": int, "ks": [int]} (Gemma 4: a random assistant drafter in OUT_DIR/<name>/assistant and,
per K, HF's assisted generation and the CPU runtime's proposals in golden.json's "assistant": `assistant_golden`)}. For each case, OUT_DIR/<name>/ckpt is a checkpoint (our writer,
`nxdi_gemma.tiny.random_weights`) and OUT_DIR/<name>/golden.json holds, per prompt, HF's greedy tokens and logits at
every step (HF forward + KV cache in a plain argmax loop: `nxdi_gemma.reference.hf_greedy`) in float32, or in the
spec's dtype, and, for float32, HF's own float32-vs-float64 deviation over the same sequences (teacher-forced, every
position), from which spec 8.1's bound is derived (a bfloat16 golden has none: bound null, the test sets its own).
With "adapters", OUT_DIR/<name>/adapters/<adapter> is a PEFT LoRA adapter (random A and B, lora_alpha = 2 x rank,
saved by PEFT) and golden.json's "adapters" holds, per adapter, HF's greedy tokens and logits with that adapter merged
into the weights by PEFT (`merge_and_unload`). A case whose golden.json already records the same spec is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import torch
import transformers

from nxdi_gemma.checkpoint import expected_shapes, load_state_dict, save_checkpoint
from nxdi_gemma.config import load_plan
from nxdi_gemma.quantize import int8_rounded_reference
from nxdi_gemma.reference import hf_greedy
from nxdi_gemma.tiny import random_hf_assistant, random_weights

FLOOR = 1e-4  # spec 8.1: absolute floor of every float32 logit bound


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prompts_of(spec: dict, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(spec["prompt_seed"])
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in spec["prompt_lengths"]]  # no specials
    shared = spec.get("shared_prefix", 0)  # optional: every prompt starts with prompt 0's first `shared` tokens
    return [prompts[0][:shared] + prompt[shared:] for prompt in prompts]


def round_on_write_cache(storage: torch.dtype):
    """HF's DynamicCache with a quantized KV cache's semantics (quantize on write, dequantize on read): what a step
    reads back of earlier tokens' K/V went through `storage` (a plain cast, NxDI's direct-cast KV quantization),
    while the step's own tokens are used as computed."""

    class RoundOnWriteCache(transformers.DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            def rounded(x):
                return x.to(storage).to(x.dtype)

            keys, values = super().update(rounded(key_states), rounded(value_states), layer_idx, *args, **kwargs)
            n = key_states.shape[-2]  # the new tokens come last in what the cache returns
            return (torch.cat([keys[..., :-n, :], key_states], dim=-2),
                    torch.cat([values[..., :-n, :], value_states], dim=-2))

    return RoundOnWriteCache


_LINEAR = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def fp8_compressed_tensors(config: dict, weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(config, tensors) of an FP8 compressed-tensors checkpoint as llm-compressor's FP8 scheme writes it (every
    attention / MLP Linear as float8_e4m3fn w / s, s = max|w| / 448 per output channel, in `weight_scale`; the
    rest as stored), and the float32 weights it dequantizes to (q * s): HF's reference."""
    hub, dequantized = {}, {}
    for name, w in weights.items():
        if not _LINEAR.search(name):
            hub[name] = dequantized[name] = w
            continue
        scale = w.float().abs().amax(dim=1, keepdim=True) / 448.0
        q = (w.float() / scale).to(torch.float8_e4m3fn)
        hub[name], hub[name + "_scale"] = q, scale
        dequantized[name] = q.float() * scale
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                 "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}}}
    return dict(config, quantization_config=quant), hub, dequantized


@torch.no_grad()
def fp32_vs_fp64(ckpt: Path, sequences: list[list[int]]) -> float:
    """max |HF float32 - HF float64| logits over whole sequences in one forward (spec 8.1's noise floor)."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        # grouped_mm (the default expert kernel) has no float64 kernel: both runs use the eager experts.
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(ckpt), dtype=dtype, attn_implementation="eager", experts_implementation="eager", use_safetensors=True
        ).eval()
        out[dtype] = [model(torch.tensor([seq])).logits[0].double() for seq in sequences]
        del model
    return max((a - b).abs().max().item() for a, b in zip(out[torch.float32], out[torch.float64], strict=True))


@torch.no_grad()
def lora_golden(ckpt: Path, folder: Path, prompts: list[list[int]], new_tokens: int, rank: int, seed: int,
                targets: list[str]) -> dict:
    """Save a random PEFT LoRA adapter for `ckpt` into `folder`; HF's greedy tokens / logits with it merged."""
    import peft

    from nxdi_gemma.reference import cache_argument, load_hf_model

    model = load_hf_model(ckpt, torch.float32)
    lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    for param_name, param in wrapped.named_parameters():
        if "lora_" in param_name:  # small random A and B: every adapted projection moves the logits
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    wrapped.save_pretrained(str(folder))
    merged = wrapped.merge_and_unload().eval()
    cache_kw = cache_argument(merged)
    tokens, logits = [], []
    for ids in prompts:
        cache = transformers.DynamicCache(config=merged.config)
        step = merged(torch.tensor([ids]), use_cache=True, **{cache_kw: cache})
        out, steps = [], []
        for i in range(new_tokens):
            last = step.logits[0, -1].float()
            steps.append(last.tolist())
            out.append(int(last.argmax()))
            if i + 1 < new_tokens:
                step = merged(torch.tensor([[out[-1]]]), use_cache=True, **{cache_kw: cache})
        tokens.append(out)
        logits.append(steps)
    return {"dir": f"adapters/{folder.name}", "rank": rank, "targets": targets, "tokens": tokens, "logits": logits,
            "peft": peft.__version__}


def hf_resave(ckpt: Path, architecture: str) -> None:
    """Replace the checkpoint in `ckpt` by HF's own save of it (its class loads our text weights and initializes the
    rest; written beside, then moved over, as the loaded tensors may map the old file)."""
    model = getattr(transformers, architecture).from_pretrained(ckpt, dtype=torch.float32)
    fresh = ckpt.with_name("ckpt.hf")
    model.save_pretrained(fresh)
    del model
    for f in sorted(ckpt.iterdir()):
        f.unlink()
    for f in sorted(fresh.iterdir()):
        f.replace(ckpt / f.name)
    fresh.rmdir()


def untied(config: dict) -> dict:
    """config.json with tie_word_embeddings false (top level and text_config, where HF's classes read it)."""
    out = dict(config, tie_word_embeddings=False)
    if isinstance(config.get("text_config"), dict):
        out["text_config"] = dict(config["text_config"], tie_word_embeddings=False)
    return out


def remove_checkpoint_dir(path: Path) -> None:
    """Remove a checkpoint folder this script wrote before (flat: files only), so a remade case starts empty."""
    if path.exists():
        for f in sorted(path.iterdir()):
            f.unlink()
        path.rmdir()


def assistant_golden(ckpt: Path, folder: Path, prompts: list[list[int]], new_tokens: int, seed: int,
                     ks: list[int]) -> dict:
    """A miniature random Gemma 4 assistant for the target at `ckpt` (transformers' Gemma4AssistantForCausalLM, HF's
    own init then perturbed: norms, layer scalars, a random token ordering; its own window 6, 2 layers), saved by
    HF into `folder`; per K: HF's assisted generation (`generate(assistant_model=...)`, greedy) with its candidate
    generator's proposals recorded (start length, tokens) per step, and the CPU runtime's proposals per step
    (`speculation.generate` with `assistant.AssistantDraft`, run new_tokens + K + 1 tokens so that every step the
    NxDI graph takes (always K proposals) has K here too)."""
    from transformers.generation import candidate_generator as cg

    from nxdi_gemma import speculation
    from nxdi_gemma.assistant import AssistantDraft, load_assistant
    from nxdi_gemma.cpu import load_model
    from nxdi_gemma.reference import load_hf_model

    target_config = json.loads((ckpt / "config.json").read_text())
    target_text = target_config.get("text_config", target_config)
    # Half the target's query heads: the assistant groups its heads over the target's KV heads its own way.
    model = random_hf_assistant(target_text, seed, num_attention_heads=target_text["num_attention_heads"] // 2)
    remove_checkpoint_dir(folder)
    model.save_pretrained(folder, safe_serialization=True)
    target_hf = load_hf_model(ckpt, torch.float32)
    target = load_model(ckpt, progress=False)
    drafter = AssistantDraft(load_assistant(folder), target)
    rounds: list = []
    original = cg.SinglePositionMultiTokenCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):  # records HF's proposals, returns them unchanged
        candidate_ids, logits = original(self, input_ids, *args, **kwargs)
        if candidate_ids.shape[1] > input_ids.shape[1]:
            rounds.append((input_ids.shape[1], candidate_ids[0, input_ids.shape[1]:].tolist()))
        return candidate_ids, logits

    out = {}
    cg.SinglePositionMultiTokenCandidateGenerator.get_candidates = recording
    try:
        for k in ks:
            model.generation_config.num_assistant_tokens = k
            model.generation_config.num_assistant_tokens_schedule = "constant"
            per_k = {"hf_tokens": [], "hf_rounds": [], "cpu_rounds": [], "cpu_tokens": []}
            for prompt in prompts:
                rounds.clear()
                ids = torch.tensor([prompt])
                hf = target_hf.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=model,
                                        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        eos_token_id=None, pad_token_id=0, top_k=None, top_p=None)
                per_k["hf_tokens"].append(hf[0, len(prompt):].tolist())
                per_k["hf_rounds"].append(list(rounds))
                ours = speculation.generate(target, drafter, [prompt], new_tokens + k + 1, k, stop_on_eos=False)
                per_k["cpu_rounds"].append(ours.rounds[0])
                per_k["cpu_tokens"].append(ours.tokens[0])
            out[str(k)] = per_k
    finally:
        cg.SinglePositionMultiTokenCandidateGenerator.get_candidates = original
    return out


def make_case(name: str, spec: dict, out: Path) -> None:
    case = out / name
    golden = case / "golden.json"
    key = spec_hash(spec)
    if golden.is_file() and json.loads(golden.read_text()).get("spec_hash") == key:
        return
    config = spec["config"]
    text = config.get("text_config", config)
    ckpt = case / "ckpt"
    remove_checkpoint_dir(ckpt)
    weights = random_weights(config, spec["seed"])
    reference = ckpt
    if spec.get("weights") == "fp8_compressed_tensors":
        # The case's checkpoint is an FP8 compressed-tensors one (as llm-compressor writes it); HF runs its
        # dequantized weights (q * weight_scale, float32) from a plain checkpoint beside it.
        reference = case / "fp8_reference"
        remove_checkpoint_dir(reference)
        hub_config, hub, dequantized = fp8_compressed_tensors(config, weights)
        save_checkpoint(ckpt, hub_config, hub)
        save_checkpoint(reference, config, dequantized)
    else:
        save_checkpoint(ckpt, config, weights)
        if spec.get("hf_saved"):
            hf_resave(ckpt, config["architectures"][0])
    if spec.get("weights") in ("int8_rounded", "int8_rounded_head"):
        # HF runs an int8-rounded copy (per output channel, per expert; nxdi_gemma.quantize.int8_rounded_reference,
        # torch's own quantizer) as float32; the case's checkpoint stays the original, which NxDI quantizes itself.
        # With the head: the rounded head is its own lm_head.weight (the embedding stays unrounded), so the
        # reference's config unties them.
        head = spec["weights"] == "int8_rounded_head"
        reference = case / "int8_reference"
        remove_checkpoint_dir(reference)
        plan = load_plan(ckpt)
        state = load_state_dict(ckpt, plan, expected_shapes(plan), dtype=None, progress=False)
        ref_config = untied(config) if head else config
        save_checkpoint(reference, ref_config, int8_rounded_reference(state, plan, lm_head=head))
    elif spec.get("weights") not in (None, "fp8_compressed_tensors"):
        raise SystemExit(f"make_goldens.py: case {name}: weights {spec['weights']!r}; only 'int8_rounded', "
                         "'int8_rounded_head' or 'fp8_compressed_tensors'")
    prompts = prompts_of(spec, text["vocab_size"])
    dtype = spec.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"make_goldens.py: case {name}: dtype {dtype!r}; choose float32 or bfloat16")
    kv_dtype = spec.get("kv_cache")
    if kv_dtype not in (None, "f8e4m3"):
        raise SystemExit(f"make_goldens.py: case {name}: kv_cache {kv_dtype!r}; only 'f8e4m3'")
    cache_class = round_on_write_cache(torch.float8_e4m3fn) if kv_dtype else None
    refs = hf_greedy(reference, prompts, spec["new_tokens"], getattr(torch, dtype), cache_class=cache_class)
    deviation = bound = None
    if dtype == "float32":
        deviation = fp32_vs_fp64(reference, [p + r.tokens for p, r in zip(prompts, refs, strict=True)])
        generation = 4 if config["model_type"].startswith("gemma4") else int(config["model_type"][5])
        # Gemma 2/3: the spec's fixed 1e-4. Gemma 4: 4x HF's own float32 error where that exceeds the floor (8.1).
        bound = FLOOR if generation < 4 else max(FLOOR, 4.0 * deviation)
    adapters = {adapter: lora_golden(ckpt, case / "adapters" / adapter, prompts, spec["new_tokens"], **settings)
                for adapter, settings in spec.get("adapters", {}).items()}
    assistant = spec.get("assistant")
    if assistant:
        assistant = assistant_golden(ckpt, case / "assistant", prompts, spec["new_tokens"], **assistant)
    doc = {
        "adapters": adapters, "assistant": assistant,
        "name": name, "spec_hash": key, "transformers": transformers.__version__, "torch": torch.__version__,
        "model_type": config["model_type"], "sliding_window": text.get("sliding_window"),
        "new_tokens": spec["new_tokens"], "dtype": dtype, "hf_fp32_vs_fp64": deviation, "bound": bound,
        "prompts": prompts, "tokens": [r.tokens for r in refs],
        "logits": [r.logits.float().tolist() for r in refs],  # float32 (or bf16) values, exact as Python floats
    }  # fmt: skip
    tmp = case / "golden.json.tmp"
    tmp.write_text(json.dumps(doc) + "\n")
    tmp.replace(golden)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: make_goldens.py SPEC.json OUT_DIR", file=sys.stderr)
        return 2
    specs = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    for name, spec in specs.items():
        make_case(name, spec, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
