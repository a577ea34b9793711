"""One vLLM start in the simulation tier: real vLLM `LLM()` + real vllm-neuron + the project's `nxdi_gemma` plugin,
NxDI in CPU mode, greedy generation of token-id prompts; writes what happened as JSON.

    python vllm_driver.py SPEC.json OUT.json

Run by test_vllm.py in the tier's environment with vllm_site/ first on PYTHONPATH, NxD and NxDI sources after it,
and NXDI_GEMMA_SIM_VLLM=1 (so the stand-ins of vllm_standins.py and `standins` are installed at start-up).
SPEC keys: ckpt, prompts (token-id lists), max_tokens (one per prompt), max_model_len, max_num_seqs, dtype,
skip_tokenizer_init, override_neuron_config, enable_prefix_caching (bool, default false) with block_size, rounds (default 1: how many times all prompts are sent, one generate each),
lora ({max_loras, max_lora_rank, ckpt_json (vllm-neuron's lora_ckpt_json), adapters: one [name, path] per prompt}: LoRA
on, each prompt sent with its adapter).
OUT keys: versions, tokens (per prompt), texts (detokenized, when a tokenizer is loaded), events (stand-in uses),
closed_calls_while_generating, model_calls (forward calls per NxDI submodel while generating), rounds (per round: tokens, prefill_tokens = the prompt tokens that reached the
NxDI context-encoding model, cached_tokens = vLLM's num_cached_tokens per request), neuron_config and final_norm_weight (of the loaded NxDI model), model_types (what the plugin registered),
hf_config_class (what transformers parsed config.json into), seconds (start, generate).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from importlib.metadata import version
from pathlib import Path

# The engine core runs in this process, so the stand-in record and the loaded model are visible here.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", _free_port())  # NxD's CPU-mode process group (one rank)
    import standins
    import vllm_standins

    if standins.mode() != "cpu" or "vllm_standins" not in sys.modules:
        raise SystemExit("vllm_driver: the stand-ins are not installed; put test/sim/vllm_site first on PYTHONPATH "
                         "and set NXDI_GEMMA_SIM_VLLM=1")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    override = {"on_cpu": True, **spec.get("override_neuron_config", {})}
    kwargs = {}
    if spec.get("speculative_config"):  # vLLM 0.16: {"method": "draft_model", "model": DIR, "num_speculative_tokens": K}
        kwargs["speculative_config"] = spec["speculative_config"]
    lora = spec.get("lora")
    requests = None
    if lora:
        from vllm.lora.request import LoRARequest

        override["lora_ckpt_json"] = lora["ckpt_json"]
        kwargs.update(enable_lora=True, max_loras=lora["max_loras"], max_lora_rank=lora["max_lora_rank"])
        ids = {name: i + 1 for i, name in enumerate(sorted({name for name, _ in lora["adapters"]}))}
        requests = [LoRARequest(name, ids[name], path) for name, path in lora["adapters"]]
    started = time.monotonic()
    llm = LLM(model=spec["ckpt"], tensor_parallel_size=1, max_model_len=spec["max_model_len"],
              max_num_seqs=spec["max_num_seqs"], dtype=spec["dtype"], seed=0,
              enable_prefix_caching=spec.get("enable_prefix_caching", False), block_size=spec.get("block_size"),
              skip_tokenizer_init=spec.get("skip_tokenizer_init", False),
              additional_config={"override_neuron_config": override}, **kwargs)
    hf_config = llm.llm_engine.model_config.hf_config
    ready = time.monotonic()

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    # ignore_eos: HF's reference is a plain argmax over max_tokens steps. More prompts than max_num_seqs and
    # different lengths: slots free up at different steps, so prefills land between other sequences' decodes.
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                             detokenize=not spec.get("skip_tokenizer_init", False)) for n in spec["max_tokens"]]
    fed: list[int] = []
    if vllm_standins.MODELS:
        # A probe on the NxDI context-encoding model (called with the bucket-padded chunk): its real tokens are
        # positions p0 .. L-1, the padding after them has position 1.
        inner = vllm_standins.MODELS[-1].context_encoding_model.model
        original = inner.forward

        def counting(input_ids, attention_mask, position_ids, *args, **kwargs):
            fed.append(int((position_ids.amax(dim=1) - position_ids[:, 0] + 1).sum()))
            return original(input_ids, attention_mask, position_ids, *args, **kwargs)

        inner.forward = counting
    calls: dict[str, int] = {}  # NxDI submodel (model wrapper tag) -> forward calls while generating
    for wrapper in (vllm_standins.MODELS[-1].models if vllm_standins.MODELS else []):
        def counted(*args, _forward=wrapper.forward, _tag=wrapper.tag, **kwargs):
            calls[_tag] = calls.get(_tag, 0) + 1
            return _forward(*args, **kwargs)

        wrapper.forward = counted
    before = standins.mark()
    rounds = []
    for _ in range(spec.get("rounds", 1)):
        start = len(fed)
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
        rounds.append({"tokens": [list(out.outputs[0].token_ids) for out in outputs],
                       "prefill_tokens": sum(fed[start:]),
                       "cached_tokens": [out.num_cached_tokens for out in outputs]})
    closed_calls = standins.calls(since=before)
    done = time.monotonic()

    from neuronx_distributed_inference.utils.constants import MODEL_TYPES

    model = vllm_standins.MODELS[-1] if vllm_standins.MODELS else None
    report = {
        "versions": {name: version(name) for name in ("vllm", "vllm-neuron", "transformers", "torch")},
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        "texts": [out.outputs[0].text for out in outputs],
        "events": vllm_standins.EVENTS,
        "closed_calls_while_generating": closed_calls,
        "rounds": rounds,
        "neuron_config": None if model is None else json.loads(model.config.to_json_string())["neuron_config"],
        # the final norm's weight as the CPU-mode model holds it: w, or 1 + w when fold_norm_offset folds the offset
        "final_norm_weight": None if model is None else _norm_weight(model),
        "model_calls": calls,
        "model_class": None if model is None else type(model).__module__ + "." + type(model).__qualname__,
        "model_types": {key: MODEL_TYPES[key]["causal-lm"].__name__ for key in ("gemma2", "gemma3", "gemma4")},
        "hf_config_class": type(hf_config).__name__,
        "seconds": {"start": round(ready - started, 1), "generate": round(done - ready, 1)},
    }
    Path(out_path).write_text(json.dumps(report))
    return 0


def _norm_weight(model) -> list[float]:
    """The final norm's weight of the loaded model (the target's under fused speculation)."""
    weights = model.models[0].model.state_dict()
    return weights["norm.weight" if "norm.weight" in weights else "target_model.norm.weight"].tolist()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
