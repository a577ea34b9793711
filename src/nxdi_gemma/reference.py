"""The Hugging Face transformers reference: greedy continuations and their logits.

transformers is imported only here, and only when a reference is asked for; our runtime never needs it. Goldens
(`nxdi-gemma reference`) record the same thing to a JSON file, for machines whose transformers lacks the model
(Neuron machines pin 4.57, which has no Gemma 4).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GemmaError, InputError

GOLDEN_FORMAT = "nxdi-gemma-golden-v1"
GOLDEN_TOP_K = 64  # logits kept per step: enough to compare the competitive part of the distribution


@dataclass
class Continuation:
    tokens: list[int]
    logits: torch.Tensor  # float32 [steps, V] (or [steps, k] with `logit_ids` for goldens)
    logit_ids: torch.Tensor | None = None  # [steps, k] vocabulary ids of `logits` when only the top-k is kept


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise GemmaError(
            "the Hugging Face reference needs transformers>=5.5: `pip install 'transformers>=5.5'` "
            "(or compare against a golden file made elsewhere with `nxdi-gemma reference`)"
        ) from None
    return transformers


def load_hf_model(model_dir: str | Path, dtype: torch.dtype):
    """HF's model of a checkpoint directory, from its safetensors only (pickle files are never opened). Callers
    validate the directory with `checkpoint.check_checkpoint` first, so HF only ever sees a checkpoint we accept."""
    transformers = import_transformers()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    auto = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.get("model_type") not in auto:
        raise GemmaError(
            f"transformers {transformers.__version__} has no model for model_type {config.get('model_type')!r}; "
            "use a newer transformers, or record a golden with `nxdi-gemma reference` where one is installed"
        )
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation="eager", use_safetensors=True
    ).eval()


def cache_argument(model) -> str:
    """The name under which this transformers' forward takes the KV cache: `cache` since 5.24 (where
    `past_key_values` still works but warns on every run), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def hf_greedy(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, dtype: torch.dtype,
              cache_class=None) -> list[Continuation]:
    """HF's greedy continuation of each prompt (batch 1, exactly max_new_tokens, EOS not treated specially).

    A plain argmax loop over HF's forward with its KV cache, not `generate()`: with `min_new_tokens`, generate()
    masks the config's EOS ids out of the choice, which would make the reference differ from a pure argmax.
    `cache_class`: a DynamicCache subclass to run with instead (e.g. a quantized-KV reference)."""
    transformers = import_transformers()
    model = load_hf_model(model_dir, dtype)
    cache_kw = cache_argument(model)
    out = []
    for ids in prompts:
        # Our own cache object, updated in place by every forward, so the output's cache field (renamed across
        # transformers versions) is never read. Built from the config as HF builds it when given none.
        cache = (cache_class or transformers.DynamicCache)(config=model.config)
        step = model(torch.tensor([ids]), use_cache=True, **{cache_kw: cache})
        tokens, logits = [], []
        for i in range(max_new_tokens):
            last = step.logits[0, -1].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
            if i + 1 < max_new_tokens:
                step = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_kw: cache})
        out.append(Continuation(tokens, torch.stack(logits)))
    return out


def write_golden(path: str | Path, model_dir: str, dtype: str, prompts: list, prompt_ids: list[list[int]],
                 refs: list[Continuation]) -> None:
    transformers = import_transformers()
    items = []
    for prompt, ids, ref in zip(prompts, prompt_ids, refs, strict=True):
        top = torch.topk(ref.logits, min(GOLDEN_TOP_K, ref.logits.shape[-1]), dim=-1)
        items.append({"prompt": prompt, "prompt_ids": ids, "tokens": ref.tokens,
                      "top_logit_ids": top.indices.tolist(), "top_logits": top.values.tolist()})
    doc = {"format": GOLDEN_FORMAT, "model": str(model_dir), "transformers": transformers.__version__,
           "dtype": dtype, "max_new_tokens": len(refs[0].tokens) if refs else 0, "prompts": items}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    tmp.replace(path)


def read_golden(path: str | Path) -> tuple[dict, list[list[int]], list[Continuation]]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the golden file ({err}); record one with `nxdi-gemma reference`") from None
    if not isinstance(doc, dict) or doc.get("format") != GOLDEN_FORMAT:
        raise InputError(f"{path}: not a golden file of format {GOLDEN_FORMAT}; record one with `nxdi-gemma reference`")
    prompt_ids = [item["prompt_ids"] for item in doc["prompts"]]
    refs = [
        Continuation(item["tokens"], torch.tensor(item["top_logits"], dtype=torch.float32),
                     torch.tensor(item["top_logit_ids"], dtype=torch.long))
        for item in doc["prompts"]
    ]
    return doc, prompt_ids, refs
