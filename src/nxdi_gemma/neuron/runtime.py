"""Compile, load and run our NxDI Gemma classes: what `nxdi-gemma compile|generate|token-match --backend neuron`
call. NxDI is imported lazily, with one clear error when it is missing. Untested on Neuron hardware; the same
code runs in NxDI's CPU mode (`on_cpu`), which is how it was checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError, GemmaError, InputError
from ..reference import Continuation

COMPILE_SPEC = "nxdi_gemma_compile.json"  # the compile config a compiled directory was built from


def import_nxdi():
    """Our NxDI classes, or a one-line error saying what to install."""
    try:
        from . import modeling
    except ImportError as err:
        raise GemmaError(
            f"the Neuron backend needs the Neuron SDK ({err.name or err}): install torch-neuronx, "
            "neuronx-distributed and neuronx-distributed-inference from the Neuron pip repository "
            "(Neuron SDK 2.28 for Trn1/Inf2, 2.29+ for Trn2), or use --backend cpu"
        ) from None
    return modeling


def read_compile_config(path: str | Path) -> dict:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read a compile config ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("neuron_config"), dict):
        raise ConfigError(f"--config {path}: expected an object with a 'neuron_config' object (see compile_configs/)")
    if "fold_norm_offset" in spec:  # where earlier versions read it; now a neuron config field
        raise ConfigError(f"--config {path}: move \"fold_norm_offset\" into \"neuron_config\"")
    return spec


def build(model_path: str, neuron_config: dict, on_cpu: bool = False, draft: str | None = None):
    """Our causal LM with its config, from a checkpoint directory (config.json read by our parser). Every option,
    ours included (`fold_norm_offset`, see neuron/config.GemmaNeuronConfig), goes in `neuron_config`, as through
    vllm-neuron's override_neuron_config.

    `draft`: a draft checkpoint for NxDI's fused speculation (`neuron_config` then has `enable_fused_speculation`,
    `speculation_length` = K + 1 and a greedy `on_device_sampling_config`). Its config is the target's neuron config
    with speculation off, as NxDI's inference demo and vllm-neuron 0.5 make it."""
    modeling = import_nxdi()
    from .config import gemma_load_config

    cls = modeling.NeuronGemmaForCausalLM
    settings = dict(neuron_config, on_cpu=True) if on_cpu else dict(neuron_config)
    if isinstance(settings.get("torch_dtype"), str):
        settings["torch_dtype"] = getattr(torch, settings["torch_dtype"])
    config = cls.get_config_cls()(cls.get_neuron_config_cls()(**settings), load_config=gemma_load_config(model_path))
    if draft is not None:
        if not config.neuron_config.enable_fused_speculation:
            raise ConfigError("a draft model needs enable_fused_speculation and speculation_length (K + 1) in the "
                              "neuron config")
        config.fused_spec_config = draft_spec_config(cls, config, draft)
    return cls(model_path, config)


def draft_spec_config(cls, config, draft: str):
    """NxDI's FusedSpecNeuronConfig for a draft checkpoint served by our class at the target's settings."""
    import copy

    from neuronx_distributed_inference.models.config import FusedSpecNeuronConfig

    from ..config import is_assistant_config, plan_from_config, read_config_json
    from ..planning import check_tp
    from ..speculation import check_draft
    from .config import gemma_load_config

    draft_json = read_config_json(draft)
    if is_assistant_config(draft_json):
        return assistant_spec_config(cls, config, draft, draft_json)
    # From config.json alone (the weights are read, names and shapes checked, when NxDI loads them).
    draft_plan = plan_from_config(draft_json, source=f"{draft}/config.json")
    check_draft(config.gemma_plan, draft_plan, config.neuron_config.speculation_length - 1)
    check_tp(draft_plan, config.neuron_config.tp_degree, option="the draft at the target's tp_degree")
    draft_neuron_config = copy.deepcopy(config.neuron_config)
    draft_neuron_config.speculation_length = 0
    draft_neuron_config.enable_fused_speculation = False
    draft_config = cls.get_config_cls()(draft_neuron_config, load_config=gemma_load_config(draft))
    return FusedSpecNeuronConfig(cls._model_cls, draft_config=draft_config, draft_model_path=draft)


def assistant_spec_config(cls, config, draft: str, draft_json: dict):
    """NxDI's FusedSpecNeuronConfig for a Gemma 4 assistant checkpoint (neuron/assistant.py): its draft config is
    the target's (speculation off) with the assistant's config.json; refused here when it cannot draft for this
    target (check_speculation adds the neuron-config checks)."""
    import copy

    from neuronx_distributed_inference.models.config import FusedSpecNeuronConfig

    from .. import assistant
    from ..config import check_assistant_fits
    from .assistant import AssistantDraftModel
    from .config import GemmaAssistantDraftConfig, gemma_load_config

    check_assistant_fits(config.gemma_plan, assistant.check_checkpoint(draft), f"--draft {draft}")
    draft_neuron_config = copy.deepcopy(config.neuron_config)
    draft_neuron_config.speculation_length = 0
    draft_neuron_config.enable_fused_speculation = False
    draft_config = GemmaAssistantDraftConfig(draft_neuron_config, load_config=gemma_load_config(config._name_or_path),
                                             assistant_hf_config=draft_json)
    return FusedSpecNeuronConfig(cls._model_cls, draft_config=draft_config, draft_model_path=draft,
                                 draft_model_cls=AssistantDraftModel)


def speculative_spec(spec: dict, draft: str, num_speculative_tokens: int) -> dict:
    """A compile config made into NxDI fused speculation with `draft` proposing K tokens per step: greedy on-device
    sampling and continuous batching (one row per prompt, each at its own position; `speculative_greedy`)."""
    neuron_config = dict(spec["neuron_config"])
    neuron_config.update(enable_fused_speculation=True, speculation_length=num_speculative_tokens + 1,
                         on_device_sampling_config={"do_sample": False, "top_k": 1}, is_continuous_batching=True,
                         ctx_batch_size=1)
    return dict(spec, neuron_config=neuron_config, draft=str(Path(draft).resolve()))


def compile_model(model_path: str, config_path: str, out_dir: str, draft: str | None = None,
                  num_speculative_tokens: int = 4) -> Path:
    """Trace and compile into a temporary sibling directory, moved into place only when complete. With `draft`:
    NxDI fused speculation (`speculative_spec`); the compile config written beside the artifacts names the draft,
    which `load_compiled` builds again."""
    spec = read_compile_config(config_path)
    if draft is not None:
        spec = speculative_spec(spec, draft, num_speculative_tokens)
    target = Path(out_dir)
    if target.exists() and any(target.iterdir()):
        raise InputError(f"--out {target} exists and is not empty; choose a new directory")
    neuron_config = dict(spec["neuron_config"])
    if neuron_config.get("quantized") and "quantized_checkpoints_path" not in neuron_config:
        # The shipped int8 compile configs name no path (none would fit every machine): the quantized checkpoint is
        # written on first use beside the output, where load finds it (the path is stored in neuron_config.json).
        neuron_config["quantized_checkpoints_path"] = str(target.resolve().with_name(f"{target.name}.quantized"))
    model = build(model_path, neuron_config, draft=spec.get("draft"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.compile(str(staging))
        (staging / COMPILE_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def load_compiled(model_path: str, compiled_dir: str):
    """A compiled model with the checkpoint's weights, ready to run."""
    modeling = import_nxdi()
    cls = modeling.NeuronGemmaForCausalLM
    if not (Path(compiled_dir) / "neuron_config.json").is_file():
        raise InputError(f"--compiled {compiled_dir}: no neuron_config.json; run `nxdi-gemma compile` first")
    spec_path = Path(compiled_dir) / COMPILE_SPEC
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    if spec.get("draft"):
        # Fused speculation: the draft's config and weights come from its checkpoint, as at compile time.
        model = build(model_path, spec["neuron_config"], draft=spec["draft"])
    else:
        model = cls(model_path, cls.get_config_cls().load(compiled_dir))
    model.load(compiled_dir)
    return model


@torch.inference_mode()
def greedy(model, prompt_ids: list[list[int]], max_new_tokens: int) -> list[Continuation]:
    """Greedy decoding of each prompt (batch row 0 of the compiled batch), exactly max_new_tokens, with logits."""
    if model.neuron_config.on_device_sampling_config is not None and not model.neuron_config.output_logits:
        raise ConfigError("this model samples on device without output_logits; token-match needs logits: compile "
                          "with \"output_logits\": true in neuron_config")
    limit = model.neuron_config.max_context_length
    out = []
    for ids in prompt_ids:
        if len(ids) > limit or len(ids) + max_new_tokens > model.neuron_config.seq_len:
            raise InputError(f"prompt of {len(ids)} tokens + {max_new_tokens} new exceeds the compiled lengths "
                             f"(max_context_length {limit}, seq_len {model.neuron_config.seq_len})")
        model.reset()
        batch = model.neuron_config.batch_size
        input_ids = torch.tensor([ids] * batch)
        positions = torch.arange(len(ids))[None].repeat(batch, 1)
        mask = torch.ones_like(input_ids)
        tokens, logits = [], []
        for step in range(max_new_tokens):
            result = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           seq_ids=torch.arange(batch))
            # On-device sampling with output_logits returns the LM head's padded width; the real vocab comes first.
            last = result.logits[0, -1, : model.config.vocab_size].float()
            logits.append(last)
            tokens.append(int(last.argmax()))
            if step + 1 < max_new_tokens:
                input_ids = torch.full((batch, 1), tokens[-1])
                positions = torch.full((batch, 1), len(ids) + step)
                mask = torch.ones(batch, len(ids) + step, dtype=torch.long)  # the cached tokens; NxDI adds the active one
        out.append(Continuation(tokens, torch.stack(logits)))
    return out


def neuron_speculative(model_path: str, compiled_dir: str):
    """`generate --backend neuron` on a model compiled with --draft: prompts -> (new tokens per prompt, the
    SpeculativeGeneration), or None when the model was compiled without a draft."""
    spec_path = Path(compiled_dir) / COMPILE_SPEC
    if not spec_path.is_file() or not json.loads(spec_path.read_text()).get("draft"):
        return None
    model = load_compiled(model_path, compiled_dir)
    return lambda prompt_ids, max_new_tokens: speculative_greedy(model, prompt_ids, max_new_tokens)


def neuron_greedy(model_path: str, compiled_dir: str, dtype: torch.dtype):
    """The token-match backend: greedy continuations from a compiled model."""
    spec_path = Path(compiled_dir) / COMPILE_SPEC
    if spec_path.is_file() and json.loads(spec_path.read_text()).get("draft"):
        raise InputError(f"--compiled {compiled_dir} was compiled with a draft (fused speculation returns tokens, "
                         "not logits): use `generate`, or compile without --draft for token-match")
    model = load_compiled(model_path, compiled_dir)
    compiled_dtype = model.neuron_config.torch_dtype
    if compiled_dtype != dtype:
        raise InputError(f"--dtype {dtype} but {compiled_dir} was compiled for {compiled_dtype}; pass the same dtype")
    return lambda prompt_ids, max_new_tokens: greedy(model, prompt_ids, max_new_tokens)


@torch.inference_mode()
def speculative_greedy(model, prompt_ids: list[list[int]], max_new_tokens: int):
    """Greedy decoding through NxDI's fused speculation (a model built with a draft), every prompt in its own batch
    row at its own position, as continuous batching runs them: each prompt prefilled alone (seq_ids = its row;
    `is_continuous_batching`, `ctx_batch_size` 1), then one fused call per step for the whole batch. In the call the
    draft proposes K = S - 1 tokens, the target verifies S and NxDI keeps, per row, the proposals that equal the
    target's greedy tokens plus the target's next one (`fused_outputs[0]`, padded with -1): the target's greedy
    tokens whatever the draft proposes. Rows continue from NxDI's next input ids and positions (what vllm-neuron
    reads). Returns `speculation.SpeculativeGeneration` (target_calls: fused calls after the prefills)."""
    from ..speculation import SpeculativeGeneration

    neuron_config = model.neuron_config
    if not neuron_config.enable_fused_speculation:
        raise ConfigError("speculative_greedy needs a model built with a draft (enable_fused_speculation)")
    spec, batch = neuron_config.speculation_length, neuron_config.batch_size
    if len(prompt_ids) > batch or not neuron_config.is_continuous_batching:
        raise ConfigError(f"{len(prompt_ids)} prompts need batch_size >= {len(prompt_ids)} and "
                          "is_continuous_batching in the neuron config")
    for ids in prompt_ids:
        # A step reads and writes S positions from its row's next one: they must fit the compiled length.
        if len(ids) > neuron_config.max_context_length or len(ids) + max_new_tokens + spec - 1 > neuron_config.seq_len:
            raise InputError(f"prompt of {len(ids)} tokens + {max_new_tokens} new + {spec - 1} speculated exceeds "
                             f"the compiled lengths (max_context_length {neuron_config.max_context_length}, seq_len "
                             f"{neuron_config.seq_len})")
    model.reset()
    rows = len(prompt_ids)
    tokens: list[list[int]] = []
    for row, ids in enumerate(prompt_ids):
        # The row's own sampling params: NxDI's default is one row per compiled batch row, and a Neuron model (NxD's
        # shape router) takes only the [ctx_batch_size, 3] its context-encoding graph was traced with.
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    position_ids=torch.arange(len(ids))[None], seq_ids=torch.tensor([row]),
                    sampling_params=model.default_sampling_params[row : row + 1])
        tokens.append([int(out.fused_outputs[0].reshape(-1)[0])])  # the target's token after the prompt
    # Rows past `rows` (the compiled batch is larger) and rows done repeat their last step (outputs ignored).
    inputs = [t[-1] for t in tokens] + [tokens[0][-1]] * (batch - rows)
    positions = [len(ids) for ids in prompt_ids] + [len(prompt_ids[0])] * (batch - rows)
    calls = proposed = accepted = 0
    # With output_logits the fused outputs also hold the draft's logits [B, S, V] (after NxDI's four): each row's
    # proposals of each step are their argmax over the first K (what the draft chose), kept in `rounds`.
    rounds: list[list[list[int]]] | None = [[] for _ in prompt_ids] if neuron_config.output_logits else None
    while min(len(t) for t in tokens) < max_new_tokens:
        # Each row's cached tokens (NxDI pads the mask to the bucket, which must hold it + S).
        mask = (torch.arange(max(positions))[None, :] < torch.tensor(positions)[:, None]).to(torch.long)
        out = model(input_ids=torch.tensor(inputs)[:, None], attention_mask=mask,
                    position_ids=torch.tensor(positions)[:, None], seq_ids=torch.arange(batch))
        calls += 1
        kept, next_ids, _, next_positions = out.fused_outputs[:4]
        for r in range(rows):
            if len(tokens[r]) >= max_new_tokens:
                continue
            new = [int(t) for t in kept[r] if t >= 0]
            if rounds is not None:
                rounds[r].append(out.fused_outputs[4][r, : spec - 1].argmax(-1).tolist())
            proposed += spec - 1
            accepted += len(new) - 1
            tokens[r] += new
            inputs[r], positions[r] = int(next_ids[r].reshape(-1)[0]), int(next_positions[r].reshape(-1)[0])
    return SpeculativeGeneration([t[:max_new_tokens] for t in tokens], calls, calls * spec, proposed, accepted,
                                 rounds=rounds)
