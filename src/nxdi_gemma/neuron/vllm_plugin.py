"""vLLM general plugin: serve nxdi_gemma's NxDI classes with vLLM on Neuron (vllm-neuron).

Declared in pyproject.toml as the `vllm.general_plugins` entry point `nxdi_gemma`; vLLM calls `register()` once in
every process it starts (API server, engine core, workers, its model-inspection subprocess). Importing this module
imports nothing from NxDI, vLLM or transformers: those are imported inside `register()` and the class factories.

Checked against vllm-neuron 0.4.1 (commit 4fac6b7, pins vLLM 0.13.0; Neuron SDK 2.28, NxDI 0.8) and vllm-neuron
0.5.0 (commit 3afb0a9, pins vLLM 0.16.0; SDK 2.29, NxDI 0.9), both with transformers 4.57 as NxDI pins it; line
numbers are 0.4.1's (0.5.0's differ by a few lines). What `register()` does:

1. NxDI model classes. vllm-neuron picks the NxDI class from `architectures[0]` (`_get_neuron_model_cls`,
   vllm_neuron/worker/neuronx_distributed_model_loader.py:921-978): "Gemma3ForCausalLM" and
   "Gemma3ForConditionalGeneration" -> MODEL_TYPES["gemma3"]["causal-lm"], "Gemma2ForCausalLM" -> ["gemma2"],
   "Gemma4For..." -> ["gemma4"], "Gemma4UnifiedFor..." (Gemma 4 12B) -> ["gemma4unified"]. It imports NxDI's MODEL_TYPES by reference (loader.py:42), so `register_models`
   mutates that dict in place: every Gemma key maps to `NeuronGemmaForCausalLM`, replacing NxDI's own gemma3 class.

2. transformers configs (`register_configs`). vLLM parses config.json with transformers' AutoConfig.
   - gemma4 / gemma4_text / gemma4_unified / gemma4_unified_text: transformers 4.57 has none, so `gemma_config_class(model_type)` is registered for every
     Gemma model type the installed transformers lacks (none under transformers 5). These classes keep every key and
     expose the text decoder's fields at top level, because vllm-neuron reads `num_key_value_heads` / `head_dim`
     from the top level of the hf_config (`_get_model_configs`, loader.py:895-913) and `get_text_config().vocab_size`
     (loader.py:75).
   - gemma3 / gemma3_text: transformers 4.57's Gemma 3 classes do not know `rope_parameters` keyed by layer type (the
     form transformers 5 writes). They keep it as a plain attribute and set their default rope_theta, and vLLM >= 0.13
     (`patch_rope_parameters`, vllm/transformers_utils/config.py) then adds that rope_theta into the nested dict and
     rejects it ("rope_parameters should have a 'rope_type' key"). Where the installed Gemma 3 classes cannot read
     that form, `gemma3_rope_config_class` subclasses them and rewrites it into the fields those classes read
     (rope_theta, rope_local_base_freq, rope_scaling) before their own __init__; Hub-style configs pass unchanged.
   Our NxDI config re-reads config.json itself, so these classes only feed vLLM.

3. transformers tokenizers (`register_tokenizers`). AutoTokenizer finds the tokenizer of a directory whose
   tokenizer_config.json names no tokenizer_class through TOKENIZER_MAPPING, keyed by config class; a class it does
   not know raises KeyError (its name). Every config class registered in 2 is mapped to the tokenizer classes the
   installed transformers uses for Gemma (TOKENIZER_MAPPING[GemmaConfig]).

4. vLLM architectures. vLLM refuses architectures its model registry does not know, even though on Neuron it never
   builds its own model class. On the Neuron platform only, `register_architectures` maps every Gemma architecture
   vLLM lacks to a text-only stand-in (`VLLM_STAND_IN`, used for inspection only: vllm-neuron builds the NxDI model).

5. Serving defaults checked before anything is compiled (`register_serving_check`). vLLM calls
   `MODELS_CONFIG_MAP[architecture].verify_and_update_config(vllm_config)` (vllm/model_executor/models/config.py, the
   registry vLLM keeps for per-architecture config fixes; vLLM 0.13.0 and 0.16.0) at the start of
   `VllmConfig.__post_init__`, in the process that parses the command line, before vllm-neuron's
   `check_and_update_config` and long before an engine process builds the NxDI model. `serving_check` (registered
   there for every Gemma architecture, on the Neuron platform only) then:
   - supplies the multimodal checkpoints' top-level text fields (below), so `--hf-overrides` is not needed;
   - with prefix caching on (vLLM's default), supplies what vllm-neuron asserts or sizes wrongly: `--block-size`
     (DEFAULT_BLOCK_SIZE) and `--num-gpu-blocks-override` (the blocks NxDI allocates), when not given
     (`supply_prefix_caching_defaults`);
   - refuses, as one `error:` line naming the flag to pass (`ServeConfigError`: a SystemExit, so `vllm serve` prints
     that line and exits 1 without a traceback; `LLM()` callers can catch it as a ConfigError): what our neuron
     config refuses in the engine (`check_supported_features`: its UNSUPPORTED_FLAGS in override_neuron_config,
     `--speculative-config`, chunked prefill), `--max-model-len` above the checkpoint's max_position_embeddings, a
     TP that does not split the heads, and a batch x length whose planner figures (`planning.memory_plan`, per
     NeuronCore, in the block KV layout when prefix caching is on) exceed the instance's HBM (it names the largest
     `--max-num-seqs` that fits). The instance comes from `planning.current_instance`: NXDI_GEMMA_INSTANCE, else
     EC2's DMI product name; neither known is refused too ('none' skips the HBM check).
   - with --enable-lora, refuses Gemma 4 MoE checkpoints (LoRA there is not exact yet), turns prefix caching off (NxDI's multi-LoRA token generation applies each batch row's
     adapter weights by position, which lines up with the sequences only in the contiguous layout's sorted batch),
     and checks every adapter of vllm-neuron's `lora_ckpt_json` as NxDI will load it
     (`serve_lora_adapters`: path, rank, target modules): each bad one is dropped with one `error:` log line naming
     it and why, and NxDI gets a copy of the file listing the others (NxDI itself would stop the whole start);
   - sets the image limit of multimodal checkpoints to 0 (`text_only_inputs`: only the text decoder is served).
   The max model length cannot be defaulted here: vllm-neuron replaces vLLM's `get_and_verify_max_len` with one that
   returns the `--max-model-len` given (None without it), and vLLM's ModelConfig rejects None before any VllmConfig
   (and so this hook) exists. `--max-model-len` is the one flag a plain `vllm serve DIR` needs.

Multimodal Gemma checkpoints ("...ForConditionalGeneration"): transformers' Gemma3Config has no top-level
num_key_value_heads / head_dim, so vllm-neuron's `_get_model_configs` would raise "Missing required fields". It
reads `text_config` instead only for architectures in NEURON_MULTI_MODAL_MODELS (loader.py:902), but membership in
that list also routes every step to `model.execute_model(...)` (neuronx_distributed_model_runner.py:749), which only
vllm-neuron's own multimodal wrappers have (a Gemma model is a NeuronCausalLM). So `serving_check` sets the two
fields on the hf_config, as `--hf-overrides "$(python -m nxdi_gemma.neuron.vllm_plugin MODEL_DIR)"` did (still
accepted; `checkpoint_hf_overrides` returns them); the vllm_config reaches vllm-neuron's workers with them set.

VLLM_PLUGINS: when set, vLLM loads only the plugins it lists (comma-separated), for general AND platform plugins
alike (vllm/plugins/__init__.py `load_plugins_by_group`). It must then list both `neuron` (vllm-neuron's platform
plugin) and `nxdi_gemma`, e.g. VLLM_PLUGINS=neuron,nxdi_gemma. Unset, every installed plugin loads, ours included.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ..config import plan_from_config, read_config_json
from ..errors import ConfigError
from ..planning import GIB, INSTANCES

logger = logging.getLogger(__name__)

# The Gemma config model_types (config.json "model_type"); also MODEL_TYPES keys served by NeuronGemmaForCausalLM,
# for NxDI's own tooling, which keys by config model_type.
GEMMA_MODEL_KEYS = (
    "gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text",
)
# MODEL_TYPES keys vllm-neuron derives from the architecture (`_get_neuron_model_cls`: the part before "For",
# lower-cased) where that is no model_type: "Gemma4UnifiedFor..." -> "gemma4unified". Not config model_types.
VLLM_NEURON_KEYS = ("gemma4unified",)

# Architectures vLLM must accept for our checkpoints (config.json `architectures[0]`).
GEMMA_ARCHITECTURES = (
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Gemma4ForCausalLM",
    "Gemma4ForConditionalGeneration",
    "Gemma4UnifiedForCausalLM",
    "Gemma4UnifiedForConditionalGeneration",
)
# Text-only vLLM class registered for Gemma architectures vLLM does not know (present since vLLM 0.8). vLLM only
# inspects it (text generation, no multimodal inputs); on Neuron, vllm-neuron builds the NxDI model instead.
VLLM_STAND_IN = "vllm.model_executor.models.gemma3:Gemma3ForCausalLM"

# The text decoder's fields exposed at the top level of our transformers configs (values from our plan).
TEXT_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "max_position_embeddings", "sliding_window", "rms_norm_eps",
)
# Fields vllm-neuron's `_get_model_configs` needs at the top level of hf_config.
NEURON_TOP_LEVEL_FIELDS = ("num_key_value_heads", "head_dim")

_TEXT_MODEL_TYPE = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
_CONFIG_CLASS_NAMES = {
    "gemma2": "Gemma2CompatConfig",
    "gemma3": "Gemma3CompatConfig",
    "gemma3_text": "Gemma3TextCompatConfig",
    "gemma4": "Gemma4CompatConfig",
    "gemma4_text": "Gemma4TextCompatConfig",
    "gemma4_unified": "Gemma4UnifiedCompatConfig",
    "gemma4_unified_text": "Gemma4UnifiedTextCompatConfig",
}
# Subclasses of transformers' own Gemma 3 configs that read rope_parameters keyed by layer type (see the docstring).
_ROPE_CLASS_NAMES = {"gemma3": "Gemma3RopeCompatConfig", "gemma3_text": "Gemma3TextRopeCompatConfig"}
_TRANSFORMERS_GEMMA3 = {"gemma3": "Gemma3Config", "gemma3_text": "Gemma3TextConfig"}

INSTALL_HINT = (
    "install the Neuron SDK's neuronx-distributed-inference and vllm-neuron "
    "(pip install --extra-index-url=https://pip.repos.neuron.amazonaws.com neuronx-distributed-inference)"
)


def register_models(model_types: MutableMapping[str, dict], causal_lm_cls: type) -> None:
    """Map every key of GEMMA_MODEL_KEYS and VLLM_NEURON_KEYS to {"causal-lm": causal_lm_cls} in NxDI's MODEL_TYPES,
    in place.

    An existing entry's other tasks (e.g. "image-encoding") are kept; its "causal-lm" class is replaced. The entry
    is a new dict, so a dict shared with something else is never mutated."""
    for key in GEMMA_MODEL_KEYS + VLLM_NEURON_KEYS:
        entry = dict(model_types.get(key) or {})
        entry["causal-lm"] = causal_lm_cls
        model_types[key] = entry


def text_fields(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The text decoder's TEXT_FIELDS from a Gemma config.json dict, as our plan reads them (HF defaults applied to
    sparse multimodal text configs). KV heads and head dim are those of layer 0, as GemmaInferenceConfig exposes
    them; vllm-neuron only uses them to size vLLM's block bookkeeping, never the NxDI caches."""
    from ..config import plan_from_config

    plan = plan_from_config(config, source=source)
    first = plan.layers[0]
    return {
        "hidden_size": plan.hidden_size,
        "num_hidden_layers": plan.num_layers,
        "num_attention_heads": plan.num_heads,
        "num_key_value_heads": first.num_kv_heads,
        "head_dim": first.head_dim,
        "vocab_size": plan.vocab_size,
        "max_position_embeddings": plan.max_position_embeddings,
        "sliding_window": plan.sliding_window,
        "rms_norm_eps": plan.rms_norm_eps,
    }


def hf_overrides_for(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """vLLM `hf_overrides` that let vllm-neuron read a multimodal Gemma checkpoint's text fields at top level.

    Empty for text-only configs (their fields are already top level). For configs with a `text_config` (Gemma 3 4B+,
    every Gemma 4), the fields vllm-neuron's `_get_model_configs` reads; vLLM applies them with `config.update`, which
    leaves `text_config` (what vLLM itself reads) untouched. Harmless where the config class already exposes them."""
    if not isinstance(config.get("text_config"), dict):
        return {}
    fields = text_fields(config, source)
    return {key: fields[key] for key in NEURON_TOP_LEVEL_FIELDS}


def checkpoint_hf_overrides(model_dir: str | Path) -> dict[str, Any]:
    """`hf_overrides_for` of a local checkpoint directory's config.json."""
    from ..config import read_config_json

    return hf_overrides_for(read_config_json(model_dir), source=str(Path(model_dir) / "config.json"))


@functools.cache
def gemma_config_class(model_type: str) -> type:
    """A transformers PretrainedConfig subclass for `model_type` (one of GEMMA_MODEL_KEYS), created on first use.

    `__init__(**kwargs)` / `from_pretrained` keep every key of config.json; when the text decoder's fields are not
    all at top level (multimodal configs nest them under `text_config`) the missing ones are filled from our plan,
    and `text_config` becomes a config object of the matching *_text class, so `get_text_config()` returns it (or
    the config itself for text-only types). Instances pickle by reference (module `__getattr__` recreates the class
    in a fresh process), as vLLM may send its hf_config to other processes."""
    if model_type not in _CONFIG_CLASS_NAMES:
        raise KeyError(f"unknown Gemma model type {model_type!r}; known: {', '.join(GEMMA_MODEL_KEYS)}")
    from transformers import PretrainedConfig

    text_type = _TEXT_MODEL_TYPE.get(model_type)

    def __init__(self, **kwargs: Any) -> None:
        text = kwargs.get("text_config")
        if isinstance(text, PretrainedConfig):
            text = text.to_dict()
        if text_type is not None and isinstance(text, dict):
            raw = {**kwargs, "text_config": text}
            fields = text_fields(raw, source=f"{model_type} config")
            text_kwargs = {**text, **{key: text.get(key, value) for key, value in fields.items()}}
            text_kwargs["model_type"] = text_type
            if text_kwargs.get("torch_dtype") is None and text_kwargs.get("dtype") is None:
                dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
                if dtype is not None:
                    text_kwargs["torch_dtype"] = str(dtype).removeprefix("torch.")
            kwargs["text_config"] = gemma_config_class(text_type)(**text_kwargs)
            for key, value in fields.items():
                kwargs.setdefault(key, value)
        elif text_type is None and "hidden_size" in kwargs and any(key not in kwargs for key in TEXT_FIELDS):
            # A text-only config omitting fields that have HF defaults (e.g. head_dim): fill them from the plan.
            for key, value in text_fields({**kwargs, "model_type": model_type}, source=f"{model_type} config").items():
                kwargs.setdefault(key, value)
        PretrainedConfig.__init__(self, **kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any):
        text = getattr(self, "text_config", None)
        return text if isinstance(text, PretrainedConfig) else self

    name = _CONFIG_CLASS_NAMES[model_type]
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"nxdi_gemma's transformers config for model_type {model_type!r} (see vllm_plugin).",
        "model_type": model_type,
        "has_no_defaults_at_init": True,  # transformers 4.x to_diff_dict would otherwise build an empty instance
        "__init__": __init__,
        "get_text_config": get_text_config,
    }
    return type(name, (PretrainedConfig,), namespace)


def legacy_rope_fields(text: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """A Gemma 3 text config dict with `rope_parameters` keyed by layer type (transformers 5) rewritten into the
    fields transformers 4.x reads: rope_theta (full layers), rope_local_base_freq (sliding layers), rope_scaling (the
    full layers' scaling, None when default). Values come from our plan, i.e. what NxDI runs. Any other dict is
    returned unchanged (Hub-style configs)."""
    from ..config import FULL, SLIDING, plan_from_config

    rope = text.get("rope_parameters")
    if not isinstance(rope, dict) or not set(rope) & {FULL, SLIDING}:
        return text
    plan = plan_from_config({**text, "model_type": "gemma3_text"}, source=source)
    specs = {layer.attention_type: layer.rope for layer in reversed(plan.layers)}  # the first layer of a type wins
    legacy = {key: value for key, value in text.items() if key != "rope_parameters"}
    if FULL in specs:
        full = specs[FULL]
        legacy["rope_theta"] = full.theta
        legacy["rope_scaling"] = None if full.kind == "default" else {"rope_type": full.kind, "factor": full.factor}
    if SLIDING in specs:
        legacy["rope_local_base_freq"] = specs[SLIDING].theta
    return legacy


def reads_layer_typed_rope(config_class: type) -> bool:
    """Whether a transformers config class takes `rope_parameters` (transformers 5's Gemma 3 classes do, 4.x's not)."""
    return "rope_parameters" in inspect.signature(config_class.__init__).parameters


@functools.cache
def gemma3_rope_config_class(model_type: str) -> type:
    """A subclass of the installed transformers' Gemma3Config ("gemma3") or Gemma3TextConfig ("gemma3_text") whose
    __init__ first applies `legacy_rope_fields` (to `text_config` for "gemma3"). isinstance checks against
    transformers' classes (vLLM's Gemma 3 processor info) still hold; instances pickle by name, as
    `gemma_config_class`'s do."""
    if model_type not in _ROPE_CLASS_NAMES:
        raise KeyError(f"no Gemma 3 RoPE config class for {model_type!r}; known: {', '.join(_ROPE_CLASS_NAMES)}")
    import transformers

    base = getattr(transformers, _TRANSFORMERS_GEMMA3[model_type])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if model_type == "gemma3_text":
            kwargs = legacy_rope_fields(kwargs, source="gemma3_text config")
        elif isinstance(kwargs.get("text_config"), dict):
            kwargs["text_config"] = legacy_rope_fields(kwargs["text_config"], source="gemma3 config text_config")
        base.__init__(self, *args, **kwargs)

    name = _ROPE_CLASS_NAMES[model_type]
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"transformers' {base.__name__}, reading rope_parameters keyed by layer type (see vllm_plugin).",
        "__init__": __init__,
    }
    return type(name, (base,), namespace)


def __getattr__(name: str) -> type:
    """Lets pickle find the config classes by name in a process that has not created them yet."""
    for model_type, class_name in _CONFIG_CLASS_NAMES.items():
        if name == class_name:
            return gemma_config_class(model_type)
    for model_type, class_name in _ROPE_CLASS_NAMES.items():
        if name == class_name:
            return gemma3_rope_config_class(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_configs(register: Callable[..., None], config_mapping: Mapping[str, type]) -> list[type]:
    """Register our config classes with `register(model_type, cls, exist_ok=True)` (AutoConfig.register), given the
    installed transformers' CONFIG_MAPPING: `gemma_config_class(t)` for every t in GEMMA_MODEL_KEYS it lacks, and
    `gemma3_rope_config_class(t)` in place of its Gemma 3 classes when they cannot read rope_parameters keyed by layer
    type. Returns our classes now in the mapping: Gemma 3's and Gemma 4's under transformers 4.57, none under
    transformers 5. Idempotent: register() runs more than once per process."""
    classes: list[type] = []
    for model_type in GEMMA_MODEL_KEYS:
        # `in` and [] only: transformers' lazy CONFIG_MAPPING is a dict subclass whose inherited .get() sees nothing.
        current = config_mapping[model_type] if model_type in config_mapping else None
        if current is None:
            cls = gemma_config_class(model_type)
        elif current.__module__ == __name__:  # registered by an earlier call
            cls = current
        elif model_type in _ROPE_CLASS_NAMES and "gemma3_text" in config_mapping \
                and not reads_layer_typed_rope(config_mapping["gemma3_text"]):  # Gemma3Config nests the text class
            cls = gemma3_rope_config_class(model_type)
        else:
            continue
        if current is not cls:
            register(model_type, cls, exist_ok=True)
        classes.append(cls)
    return classes


def register_tokenizers(register: Callable[..., None], config_classes: Iterable[type], gemma_tokenizer: Any) -> None:
    """Map every class of `config_classes` to the Gemma tokenizer in transformers' TOKENIZER_MAPPING through
    `register` (AutoTokenizer.register). `gemma_tokenizer` is TOKENIZER_MAPPING[GemmaConfig]: a (slow, fast) pair in
    transformers 4.x (either may be None when sentencepiece / tokenizers is missing), one class in transformers 5."""
    if isinstance(gemma_tokenizer, tuple):
        slow, fast = gemma_tokenizer
        kwargs = {"slow_tokenizer_class": slow, "fast_tokenizer_class": fast}
    else:
        kwargs = {"tokenizer_class": gemma_tokenizer}
    for config_class in config_classes:
        register(config_class, exist_ok=True, **kwargs)


def register_architectures(register: Callable[[str, str], None], supported: Iterable[str]) -> list[str]:
    """Register VLLM_STAND_IN with `register(arch, "module:Class")` (vLLM's ModelRegistry.register_model) for every
    GEMMA_ARCHITECTURES entry vLLM's registry lacks (`supported`). Returns the registered architectures."""
    known = set(supported)
    missing = [arch for arch in GEMMA_ARCHITECTURES if arch not in known]
    for arch in missing:
        register(arch, VLLM_STAND_IN)
    return missing


class ServeConfigError(SystemExit, ConfigError):
    """A serving configuration refused before compiling. A SystemExit whose code is the one `error:` line, so the
    `vllm serve` command prints it and exits 1 without a traceback; also a ConfigError for `LLM()` callers."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


# vLLM's --block-size when prefix caching is on (vLLM's default) and none is given: vllm-neuron asserts one is set
# (it becomes NxDI's pa_block_size); 32 is what scripts/serve_vllm.sh has always passed.
DEFAULT_BLOCK_SIZE = 32


def supply_prefix_caching_defaults(cache_config: Any, override: Mapping[str, Any], max_model_len: int,
                                   batch: int) -> dict[str, int]:
    """With prefix caching on, the two settings vllm-neuron needs but does not default, set on vLLM's CacheConfig
    (vLLM 0.13.0 / 0.16.0) before vllm-neuron's `check_and_update_config` reads them; returns what was supplied.
    - block_size: override_neuron_config's pa_block_size, else DEFAULT_BLOCK_SIZE (vllm-neuron asserts one).
    - num_gpu_blocks_override: override_neuron_config's pa_num_blocks, else ceil(max_model_len / block_size) x
      max_num_seqs, the blocks vllm-neuron has NxDI allocate. Without it vllm-neuron sizes vLLM's block pool from the
      device's free memory and layer 0's head dim, which need not match NxDI's pool (Gemma 4's full layers have
      twice layer 0's head dim), so vLLM could hand out block ids NxDI does not have."""
    supplied: dict[str, int] = {}
    if not cache_config.enable_prefix_caching:
        return supplied
    if cache_config.block_size is None:
        cache_config.block_size = supplied["block_size"] = int(override.get("pa_block_size", DEFAULT_BLOCK_SIZE))
    if cache_config.num_gpu_blocks_override is None:
        blocks = override.get("pa_num_blocks", -(-max_model_len // cache_config.block_size) * batch)
        cache_config.num_gpu_blocks_override = supplied["num_gpu_blocks_override"] = int(blocks)
    return supplied


def check_supported_features(override: Mapping[str, Any], unsupported: Iterable[str], *, speculative: str | None,
                             chunked_prefill: bool) -> None:
    """Refuse, before anything is built, what GemmaNeuronConfig would refuse in the engine process (`unsupported`:
    its UNSUPPORTED_FLAGS, passed from neuron/config.py so a feature that becomes supported is accepted here too):
    flags set in override_neuron_config, vLLM speculation other than a draft model (`speculative`: the method of
    --speculative-config, None without one; vllm-neuron turns it into NxDI fused speculation, which we run with a
    draft model only) and chunked prefill (vllm-neuron's scheduler keeps it only with
    DISABLE_NEURON_CUSTOM_SCHEDULER=1)."""
    UNSUPPORTED_FLAGS = tuple(unsupported)  # noqa: N806 (the name it has in neuron/config.py)
    given = [flag for flag in (*UNSUPPORTED_FLAGS, "attn_kernel_enabled") if override.get(flag)]
    if given:
        raise ServeConfigError(f"override_neuron_config sets {', '.join(given)}, which nxdi-gemma does not support: "
                               "remove them from --additional-config")
    if speculative is not None and "enable_fused_speculation" in UNSUPPORTED_FLAGS:
        raise ServeConfigError("speculative decoding through vllm-neuron (fused speculation) is not supported by "
                               "nxdi-gemma: leave out --speculative-config")
    if speculative is not None and speculative != "draft_model":
        raise ServeConfigError(f"--speculative-config method {speculative!r}: nxdi-gemma serves speculation with a "
                               "draft model only (NxDI fused speculation): pass \"method\": \"draft_model\" with "
                               "\"model\": DRAFT_DIR, or leave out --speculative-config")
    if chunked_prefill and "is_chunked_prefill" in UNSUPPORTED_FLAGS:
        raise ServeConfigError("DISABLE_NEURON_CUSTOM_SCHEDULER=1 makes vllm-neuron run chunked prefill, which "
                               "nxdi-gemma does not support: unset DISABLE_NEURON_CUSTOM_SCHEDULER")


def check_serving_settings(config: dict[str, Any], source: str, *, tp: int, batch: int, max_model_len: int,
                           dtype: str, prefix_caching: bool, block_size: int | None, instance: str | None,
                           num_blocks: int | None = None, weights: str = "model",
                           kv_cache: str = "model", quantize_lm_head: bool = False,
                           prefill_batch: int = 1) -> dict[str, Any]:
    """What `serving_check` decides, from plain values: the top-level hf_config fields to set (`hf_overrides_for`),
    or ServeConfigError naming the flag to pass. `batch`, `tp`, `max_model_len`: what vllm-neuron will give NxDI
    (batch_size, tp_degree, seq_len); `block_size` / `num_blocks`: the block KV layout of prefix caching (HBM is
    planned for it); `instance`: a planning.INSTANCES name, None to skip the HBM check; `weights` / `kv_cache`: the
    quantization schemes of override_neuron_config (`quantization_schemes`); `prefill_batch`: NxDI's ctx_batch_size
    (vllm-neuron's default neuron config sets 1: prompts are prefilled one sequence at a time)."""
    from ..errors import GemmaError
    from ..planning import DTYPE_BYTES, check_tp, largest_fit, memory_plan

    try:
        plan = plan_from_config(config, source=source)
        check_tp(plan, tp, option="--tensor-parallel-size")
    except GemmaError as error:
        raise ServeConfigError(str(error)) from None
    if prefix_caching and block_size is None:
        raise ServeConfigError("prefix caching on Neuron needs a KV block size: pass --block-size (e.g. 32), or "
                               "--no-enable-prefix-caching")
    if not prefix_caching:
        block_size = num_blocks = None
    if max_model_len > plan.max_position_embeddings:
        raise ServeConfigError(f"--max-model-len {max_model_len} exceeds {source}'s max_position_embeddings "
                               f"({plan.max_position_embeddings}); pass --max-model-len {plan.max_position_embeddings}"
                               " or less")
    if dtype not in DTYPE_BYTES:
        raise ServeConfigError(f"--dtype {dtype} is not served by nxdi-gemma; pass one of {', '.join(DTYPE_BYTES)}")
    if instance is not None:
        if tp > INSTANCES[instance].cores:
            raise ServeConfigError(f"--tensor-parallel-size {tp} exceeds the {INSTANCES[instance].cores} "
                                   f"NeuronCores of {instance}")
        schemes = {"weights": weights, "kv_cache": kv_cache, "quantize_lm_head": quantize_lm_head}
        need = memory_plan(plan, instance, tp, batch, max_model_len, dtype, block_size, num_blocks,
                           prefill_batch=prefill_batch, **schemes)
        if not need.fits:
            layout = "" if block_size is None else f" (block KV layout: {num_blocks} blocks of {block_size})"
            figures = (f"{_gib(need.total_per_core)} per NeuronCore (weights {_gib(need.weights_per_core)}, KV cache "
                       f"{_gib(need.kv_cache_per_core)}{layout}, activations {_gib(need.activations_per_core)}, "
                       f"reserve {_gib(need.reserve_per_core)}) of {instance}'s {_gib(need.hbm_per_core)}")
            _, fitting = largest_fit(plan, instance, tp, dtype, seq_len=max_model_len, block_size=block_size,
                                     prefill_batch=prefill_batch, **schemes)
            what = f"batch {batch} (--max-num-seqs) x --max-model-len {max_model_len} at TP {tp} needs {figures}"
            if fitting:
                raise ServeConfigError(f"{what}: pass --max-num-seqs {fitting} or less (or a smaller --max-model-len"
                                       " or a larger --tensor-parallel-size)")
            raise ServeConfigError(f"{what}, and batch 1 does not fit either: pass a larger --tensor-parallel-size "
                                   "or a smaller --max-model-len")
    return hf_overrides_for(config, source)


def quantization_schemes(override: dict[str, Any]) -> dict[str, Any]:
    """The planner's weights / kv_cache schemes of an override_neuron_config (quantized, quantization_dtype,
    kv_cache_quant: NxDI's fields; the fp8 KV cache is the only one served, see quantize.check_kv_cache_quant; and
    our quantize_lm_head, which counts only with quantized weights: GemmaNeuronConfig refuses it alone)."""
    weights = "model"
    if override.get("quantized"):
        weights = "fp8" if override.get("quantization_dtype") == "f8e4m3" else "int8"
    return {"weights": weights, "kv_cache": "fp8" if override.get("kv_cache_quant") else "model",
            "quantize_lm_head": bool(override.get("quantize_lm_head")) and weights != "model"}


def text_only_inputs(multimodal_config: Any) -> None:
    """nxdi-gemma serves the text decoder of multimodal checkpoints: vLLM's image limit (MultiModalConfig,
    vLLM 0.13.0 / 0.16.0), 999 when not given, becomes 0, so vLLM neither loads the checkpoint's image processor nor
    profiles images, and refuses image inputs itself. An image limit above 0 given by the user is refused."""
    if multimodal_config is None:
        return
    limits = multimodal_config.limit_per_prompt
    given = limits.get("image")
    if given is not None and given.count > 0:
        raise ServeConfigError(f"--limit-mm-per-prompt allows {given.count} image(s), but nxdi-gemma serves the text "
                               "decoder only: pass --limit-mm-per-prompt '{\"image\": 0}' or leave it out")
    if given is None:
        from vllm.config.multimodal import ImageDummyOptions

        limits["image"] = ImageDummyOptions(count=0)


# Linears of our layers that NxDI's LoRA serving can wrap (attention through NxDI's projections, MLP: AdapterMLP).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Key of the lora_ckpt_json the serving check hands NxDI when it dropped adapters: {name: reason}. NxDI reads only
# "lora-ckpt-dir" / "lora-ckpt-paths" / "lora-ckpt-paths-cpu"; GemmaLoraModelManager reads this to name the reason.
DROPPED_KEY = "nxdi-gemma-dropped"


def lora_adapter_problem(folder: Path, max_lora_rank: int, plan_has_moe: bool) -> str | None:
    """Why NxDI could not serve the PEFT adapter in `folder` next to the others, or None: files missing, rank above
    --max-lora-rank (NxDI would silently raise the rank of every slot), a target module our layers do not have as
    a LoRA-capable linear, MLP linears on a Gemma 4 MoE model (NxDI's name matching, a suffix match, would also
    wrap the stacked expert linears experts.gate_proj/up_proj/down_proj, ColumnParallelLinears of another shape)."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file() or not any(folder.glob("*.safetensors")):
        return f"no adapter_config.json and *.safetensors in {folder}"
    try:
        adapter = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"{config_file} is not readable JSON ({error})"
    rank = adapter.get("r")
    if not isinstance(rank, int) or rank > max_lora_rank:
        return f"rank {rank}, above --max-lora-rank {max_lora_rank} (pass a larger --max-lora-rank to serve it)"
    targets = adapter.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        return (f"targets {unknown}, which nxdi-gemma's layers do not have as LoRA-capable linears "
                f"({', '.join(LORA_TARGETS)})")
    mlp = sorted({"gate_proj", "up_proj", "down_proj"} & set(targets))
    if plan_has_moe and mlp:
        return (f"targets {mlp}: on a Gemma 4 MoE model NxDI's name matching would also wrap the stacked expert "
                "linears (experts.gate_proj/up_proj/down_proj); serve attention adapters (q/k/v/o_proj) there")
    return None


def select_lora_adapters(ckpt_json: str | None, max_lora_rank: int,
                         plan_has_moe: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The adapters vllm-neuron's `lora_ckpt_json` (override_neuron_config) names, checked the way NxDI will load
    them (LoraServingConfig / LoraCheckpoint, 0.8 and 0.9: "lora-ckpt-dir" joined with each path of
    "lora-ckpt-paths" and "lora-ckpt-paths-cpu"; a PEFT folder with adapter_config.json and safetensors). Returns
    (the JSON content to hand NxDI: the same with only the adapters that pass and an absolute lora-ckpt-dir,
    {dropped adapter: reason}). ServeConfigError when the file is unusable or no adapter passes."""
    if ckpt_json is None:
        raise ServeConfigError("--enable-lora on Neuron needs the adapters listed in a JSON file: pass --additional-"
                               "config '{\"override_neuron_config\": {\"lora_ckpt_json\": \"lora.json\"}}' (see README)")
    path = Path(ckpt_json).expanduser()
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ServeConfigError(f"lora_ckpt_json {path}: cannot read it as JSON ({error})") from None
    if not isinstance(content, dict):
        raise ServeConfigError(f"lora_ckpt_json {path}: not a JSON object")
    base = Path(content.get("lora-ckpt-dir", ".")).expanduser().absolute()
    kept: dict[str, Any] = {"lora-ckpt-dir": str(base)}
    dropped: dict[str, str] = dict(content.get(DROPPED_KEY) or {})
    for key in ("lora-ckpt-paths", "lora-ckpt-paths-cpu"):
        kept[key] = {}
        for name, relative in (content.get(key) or {}).items():
            problem = dropped.get(name) or lora_adapter_problem(base / relative, max_lora_rank, plan_has_moe)
            if problem is None:
                kept[key][name] = relative
            else:
                dropped[name] = problem
    if not kept["lora-ckpt-paths"] and not kept["lora-ckpt-paths-cpu"]:
        reasons = "; ".join(f"{name!r}: {why}" for name, why in dropped.items()) or "none listed under lora-ckpt-paths"
        raise ServeConfigError(f"lora_ckpt_json {path}: no LoRA adapter can be served ({reasons})")
    if dropped:
        kept[DROPPED_KEY] = dropped
    return kept, dropped


def write_lora_ckpt_json(content: Mapping[str, Any], folder: Path) -> Path:
    """`content` as a lora_ckpt_json file in `folder`, named by its digest (the same adapters give the same file,
    so vllm-neuron's compiled-artifact hash of override_neuron_config stays stable), written atomically."""
    import hashlib
    import tempfile

    text = json.dumps(content, sort_keys=True, indent=1)
    target = folder / f"nxdi-gemma-lora-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not target.is_file():
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, target)
    return target


def serve_lora_adapters(override: MutableMapping[str, Any], max_lora_rank: int, plan_has_moe: bool) -> list[str]:
    """With --enable-lora: keep the adapters of override_neuron_config's lora_ckpt_json that NxDI can serve. Each
    one it cannot is dropped with one `error:` log line naming it and why, and lora_ckpt_json is pointed at a copy
    listing the others (in the temporary directory), so the server starts and serves them. Returns the kept names."""
    import tempfile

    content, dropped = select_lora_adapters(override.get("lora_ckpt_json"), max_lora_rank, plan_has_moe)
    kept = sorted({*content["lora-ckpt-paths"], *content["lora-ckpt-paths-cpu"]})
    for name, reason in dropped.items():
        logger.error("error: LoRA adapter %r in %s is not served: %s; serving the others (%s)", name,
                     override["lora_ckpt_json"], reason, ", ".join(kept))
    if dropped:
        override["lora_ckpt_json"] = str(write_lora_ckpt_json(content, Path(tempfile.gettempdir())))
    return kept


def serving_check(vllm_config: Any) -> None:
    """The MODELS_CONFIG_MAP hook (see the module docstring, 5): reads the settings vllm-neuron will pass to NxDI
    (its `_get_default_neuron_config`, then `override_neuron_config`'s batch_size / tp_degree / seq_len / torch_dtype)
    and applies `check_serving_settings`. Checked against vLLM 0.13.0 / 0.16.0 and vllm-neuron 0.4.1 / 0.5.0."""
    from ..errors import GemmaError
    from ..planning import current_instance, read_dmi_product_name
    from .config import UNSUPPORTED_FLAGS

    model_config = vllm_config.model_config
    source = str(Path(model_config.model) / "config.json")
    try:
        config = read_config_json(model_config.model)
        instance = current_instance(dict(os.environ), read_dmi_product_name())
    except GemmaError as error:
        raise ServeConfigError(str(error)) from None
    override = (vllm_config.additional_config or {}).get("override_neuron_config") or {}
    dtype = override.get("torch_dtype", model_config.dtype)
    cache = vllm_config.cache_config
    speculative = vllm_config.speculative_config
    check_supported_features(override, UNSUPPORTED_FLAGS,
                             speculative=None if speculative is None else str(speculative.method),
                             chunked_prefill=os.environ.get("DISABLE_NEURON_CUSTOM_SCHEDULER", "0") == "1")
    batch = int(override.get("batch_size", vllm_config.scheduler_config.max_num_seqs))
    max_model_len = int(override.get("seq_len", model_config.max_model_len))
    lora = getattr(vllm_config, "lora_config", None)
    if lora is not None and cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        logger.warning("nxdi_gemma: prefix caching turned off with --enable-lora: NxDI's multi-LoRA token generation "
                       "(0.8 and 0.9) applies the active adapter weights by batch row, which match the sequences "
                       "only in the contiguous KV layout (its batch is sorted by sequence; the block layout's is "
                       "not)")
    if speculative is not None and cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        logger.warning("nxdi_gemma: prefix caching turned off with --speculative-config: nxdi-gemma's fused "
                       "speculation runs on the contiguous KV layout only (ring caches sized for the verified "
                       "tokens)")
    supplied = supply_prefix_caching_defaults(cache, override, max_model_len, batch)
    if supplied:
        logger.info("nxdi_gemma: prefix caching on (vLLM's default): supplied %s for vllm-neuron's block KV layout "
                    "(pass --block-size / --num-gpu-blocks-override to choose)", supplied)
    fields = check_serving_settings(
        config, source, tp=int(override.get("tp_degree", vllm_config.parallel_config.tensor_parallel_size)),
        batch=batch, max_model_len=max_model_len, dtype=str(dtype).removeprefix("torch."),
        prefix_caching=bool(cache.enable_prefix_caching), block_size=cache.block_size, instance=instance,
        num_blocks=cache.num_gpu_blocks_override, prefill_batch=int(override.get("ctx_batch_size", 1)),
        **quantization_schemes(override))
    if lora is not None:
        if any(layer.moe for layer in plan_from_config(config, source=source).layers):
            raise ServeConfigError(f"--enable-lora is not supported on Gemma 4 MoE checkpoints ({source}): with "
                                   "NxDI's LoRA serving on, even attention-only adapters and the zero adapter give "
                                   "tokens that differ from HF in the simulation tier; leave out --enable-lora")
        serve_lora_adapters(override, lora.max_lora_rank, plan_has_moe=False)
    text_only_inputs(model_config.multimodal_config)
    hf_config = model_config.hf_config
    missing = {key: value for key, value in fields.items() if getattr(hf_config, key, None) is None}
    if missing:
        hf_config.update(missing)  # what vLLM does with --hf-overrides
        logger.info("nxdi_gemma: set %s on the hf_config of %s (no --hf-overrides needed)", missing,
                    model_config.model)


class GemmaServingConfig:
    """vLLM MODELS_CONFIG_MAP entry for the Gemma architectures on Neuron: `serving_check`, after the entry vLLM
    itself had for the architecture (none in vLLM 0.13.0 / 0.16.0), if any."""

    previous: dict[str, Any] = {}

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        previous = GemmaServingConfig.previous.get(vllm_config.model_config.architecture)
        if previous is not None:
            previous.verify_and_update_config(vllm_config)
        serving_check(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        """vLLM 0.16's per-ModelConfig hook (`ModelConfig._try_verify_and_update_model_config`, called on every
        MODELS_CONFIG_MAP entry, e.g. for a draft's ModelConfig with `--speculative-config`; vLLM 0.13 has none): the
        previous entry's, if it has one. Our check needs the whole VllmConfig, so it runs in `verify_and_update_config`
        only."""
        previous = GemmaServingConfig.previous.get(model_config.architecture)
        hook = getattr(previous, "verify_and_update_model_config", None)
        if hook is not None:
            hook(model_config)


def register_serving_check(config_map: MutableMapping[str, Any]) -> list[str]:
    """Register GemmaServingConfig in vLLM's MODELS_CONFIG_MAP for every GEMMA_ARCHITECTURES entry, keeping any
    entry vLLM had (called first). Idempotent. Returns the architectures registered."""
    for arch in GEMMA_ARCHITECTURES:
        current = config_map.get(arch)
        if current is not GemmaServingConfig:
            if current is not None:
                GemmaServingConfig.previous[arch] = current
            config_map[arch] = GemmaServingConfig
    return list(GEMMA_ARCHITECTURES)


def _on_neuron_platform() -> bool:
    """True when vLLM's current platform is Neuron (vllm-neuron's OOT platform, or a fork's built-in one)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    if type(current_platform).__module__.split(".")[0] == "vllm_neuron":
        return True
    is_neuron = getattr(current_platform, "is_neuron", None)
    return bool(is_neuron()) if callable(is_neuron) else False


def register() -> None:
    """The `vllm.general_plugins` entry point. Safe to call repeatedly; a no-op (one warning) without NxDI."""
    try:
        from neuronx_distributed_inference.utils.constants import MODEL_TYPES
    except ImportError as error:
        logger.warning("nxdi_gemma vLLM plugin inactive: NxDI is not importable (%s); to serve Gemma on Neuron, %s",
                       error, INSTALL_HINT)
        return
    try:
        from .modeling import NeuronGemmaForCausalLM
    except ImportError as error:
        raise RuntimeError(
            f"nxdi_gemma vLLM plugin: NxDI is installed but nxdi_gemma.neuron.modeling does not import ({error}); "
            "install a supported NxDI (Neuron SDK 2.28 or 2.29), or leave nxdi_gemma out of VLLM_PLUGINS"
        ) from error

    register_models(MODEL_TYPES, NeuronGemmaForCausalLM)

    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    configs = register_configs(AutoConfig.register, CONFIG_MAPPING)
    register_tokenizers(AutoTokenizer.register, configs, TOKENIZER_MAPPING[CONFIG_MAPPING["gemma"]])

    architectures: list[str] = []
    if "vllm" in sys.modules and _on_neuron_platform():
        from vllm import ModelRegistry

        architectures = register_architectures(ModelRegistry.register_model, ModelRegistry.get_supported_archs())
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        register_serving_check(MODELS_CONFIG_MAP)
    logger.info("nxdi_gemma vLLM plugin: NxDI MODEL_TYPES %s -> %s; transformers config classes (with the Gemma "
                "tokenizer) registered: %s; vLLM architectures added: %s", list(GEMMA_MODEL_KEYS + VLLM_NEURON_KEYS),
                NeuronGemmaForCausalLM.__name__, [cls.__name__ for cls in configs] or "none",
                architectures or "none")


def main(argv: list[str] | None = None) -> int:
    """`python -m nxdi_gemma.neuron.vllm_plugin MODEL_DIR`: print the JSON for vLLM's --hf-overrides."""
    from ..errors import GemmaError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nxdi_gemma.neuron.vllm_plugin MODEL_DIR  (prints JSON for vllm --hf-overrides)",
              file=sys.stderr)
        return 2
    try:
        print(json.dumps(checkpoint_hf_overrides(args[0])))
    except GemmaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
