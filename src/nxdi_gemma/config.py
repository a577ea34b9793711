"""Hugging Face `config.json` -> one immutable per-layer plan of a Gemma 2 / 3 / 4 text decoder.

This is the only place that interprets Gemma config fields. The plan is read from the plain JSON dict, never
through `transformers` (Neuron machines pin transformers 4.57, which has no Gemma 4 and silently misreads Gemma 3
configs saved by transformers 5). Omitted fields take the transformers 5 class defaults, exactly as HF does for
the sparse `text_config` of multimodal checkpoints (spec section 4.1); everything else that the plan cannot honour
exactly is a ConfigError naming the field and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
LayerType = Literal["sliding_attention", "full_attention"]
RopeKind = Literal["default", "linear", "proportional"]

# model_type -> (generation, is the text config nested under "text_config")
MODEL_TYPES: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3_text": (3, False),
    "gemma3": (3, True),
    "gemma4_text": (4, False),
    "gemma4": (4, True),
    # Gemma 4 12B: HF's gemma4_unified text decoder is Gemma 4's (Gemma 2's four-norm block with layer_scalar,
    # Gemma 4 / 3n norms, attention, RoPE and embedding) without PLE and MoE, so it plans as generation 4.
    "gemma4_unified_text": (4, False),
    "gemma4_unified": (4, True),
}
# The text model_type a nested `text_config` must have (when it names one): another type would make HF build a
# different decoder from the same fields.
NESTED_TEXT_TYPE = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}
UNIFIED_TYPES = ("gemma4_unified", "gemma4_unified_text")
# Fields Gemma4UnifiedTextConfig removes from Gemma4TextConfig (transformers 5.25: "PLE and MoE is not used"), with
# the value that means "off". HF accepts and ignores them; we refuse any other value rather than plan a decoder
# the checkpoint's own class does not build.
UNIFIED_ABSENT = {
    "hidden_size_per_layer_input": 0, "enable_moe_block": False, "num_experts": None, "top_k_experts": None,
    "moe_intermediate_size": None,
}

# transformers 5.23 class defaults (Gemma2Config, Gemma3TextConfig, Gemma4TextConfig) for the fields that affect
# the forward pass. The geometry fields in REQUIRED have HF defaults too, but a config without them is not a real
# checkpoint's, so we refuse it rather than silently build a 2B-shaped model.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "layer_types": None,
    "rope_parameters": None,
}
DEFAULTS: dict[int, dict[str, Any]] = {
    2: {
        **_COMMON_DEFAULTS,
        "vocab_size": 256000,
        "max_position_embeddings": 8192,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    3: {
        **_COMMON_DEFAULTS,
        "vocab_size": 262208,
        "max_position_embeddings": 131072,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": None,
        "sliding_window_pattern": 6,
    },
    4: {
        **_COMMON_DEFAULTS,
        "vocab_size": 262144,
        "max_position_embeddings": 131072,
        "sliding_window": 512,
        "final_logit_softcapping": None,
        "global_head_dim": 512,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "num_experts": None,
        "top_k_experts": None,
        "moe_intermediate_size": None,
        "hidden_size_per_layer_input": 256,
        "vocab_size_per_layer_input": 262144,
    },
}
# transformers 5.25 Gemma4UnifiedTextConfig: Gemma4TextConfig's defaults with a 1024 window, 262144 positions, and no
# PLE or MoE.
UNIFIED_DEFAULTS: dict[str, Any] = {
    **DEFAULTS[4], "sliding_window": 1024, "max_position_embeddings": 262144, **UNIFIED_ABSENT,
}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type. `inv_freq()` has head_dim/2 entries (zeros where dims pass through)."""

    kind: RopeKind
    theta: float
    head_dim: int
    factor: float = 1.0  # linear: frequencies divided by it; proportional: likewise (HF's "factor", default 1)
    partial_rotary_factor: float = 1.0  # proportional only: share of the head whose pairs rotate

    @property
    def rotated_pairs(self) -> int:
        if self.kind == "proportional":
            return int(self.partial_rotary_factor * self.head_dim // 2)
        return self.head_dim // 2

    def inv_freq(self):
        """float32 inverse frequencies, exactly as transformers computes them."""
        import torch

        exponents = torch.arange(0, 2 * self.rotated_pairs, 2, dtype=torch.int64).to(torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.kind == "proportional":
            passthrough = self.head_dim // 2 - self.rotated_pairs
            inv_freq = torch.cat([inv_freq, torch.zeros(passthrough, dtype=torch.float32)])
        return inv_freq / self.factor if self.kind in ("linear", "proportional") else inv_freq


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    intermediate_size: int


@dataclass(frozen=True)
class LayerPlan:
    index: int
    attention_type: LayerType
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int | None  # keys visible to a query: q - W < k <= q; None on full layers
    rope: RopeSpec
    kv_source: int  # the layer whose K/V this layer attends to (itself unless KV-shared)
    k_eq_v: bool  # V is the raw K projection (Gemma 4 global layers with attention_k_eq_v)
    intermediate_size: int
    moe: MoeSpec | None

    @property
    def is_sliding(self) -> bool:
        return self.attention_type == SLIDING

    @property
    def shares_kv(self) -> bool:
        """True when this layer reads another layer's cache and has no K/V projection or cache of its own."""
        return self.kv_source != self.index


@dataclass(frozen=True)
class GemmaPlan:
    generation: int  # 2, 3 or 4
    model_type: str  # as in config.json (multimodal types keep their own name)
    hidden_size: int
    vocab_size: int
    layers: tuple[LayerPlan, ...]
    rms_norm_eps: float
    query_pre_attn_scalar: float | None  # Gemma 2/3; Gemma 4 attends with scale 1.0
    attn_logit_softcap: float | None  # Gemma 2 only
    final_logit_softcap: float | None
    sliding_window: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    ple_dim: int  # Gemma 4 per-layer-input width P; 0 = no PLE
    ple_vocab_size: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def norm_adds_one(self) -> bool:
        """Gemma 2/3 norms scale by (1 + w); Gemma 4 norms by w."""
        return self.generation < 4

    @property
    def has_qk_norm(self) -> bool:
        return self.generation >= 3

    @property
    def has_v_norm(self) -> bool:
        return self.generation == 4

    @property
    def has_layer_scalar(self) -> bool:
        return self.generation == 4

    @property
    def attention_scale(self) -> float:
        if self.generation == 4:
            return 1.0
        return self.query_pre_attn_scalar**-0.5

    @property
    def embed_scale(self) -> float:
        """sqrt(H) as a float32 value; the runtime rounds it to the embedding dtype before multiplying."""
        return math.sqrt(self.hidden_size)

    @property
    def num_heads(self) -> int:
        return self.layers[0].num_heads

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(layer.attention_type for layer in self.layers)

    @property
    def kv_producers(self) -> tuple[int, ...]:
        """Layers that own a KV cache."""
        return tuple(layer.index for layer in self.layers if not layer.shares_kv)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """The raw `config.json` of a checkpoint directory, with one-line errors for a missing or broken file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json; point at a local Hugging Face Gemma checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); fix or re-download the file") from None


def load_plan(model_dir: str | Path) -> GemmaPlan:
    """Read `config.json` from a checkpoint directory and build its plan."""
    return plan_from_config(read_config_json(model_dir), source=str(Path(model_dir) / "config.json"))


def text_config_of(config: dict[str, Any], source: str = "config.json") -> tuple[int, dict[str, Any]]:
    """The generation and the text-decoder part of a (possibly multimodal) config dict."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: missing 'model_type'; expected one of {sorted(MODEL_TYPES)}")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; expected one of {sorted(MODEL_TYPES)} "
            "(Gemma 3n is a different architecture)"
        )
    generation, nested = MODEL_TYPES[model_type]
    if not nested:
        return generation, config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: model_type {model_type!r} needs a 'text_config' object with the decoder's fields")
    text_type = text.get("model_type")
    if text_type is not None and text_type != NESTED_TEXT_TYPE[model_type]:
        raise ConfigError(
            f"{source}: text_config model_type {text_type!r} does not belong in a {model_type!r} checkpoint "
            f"(expected {NESTED_TEXT_TYPE[model_type]!r}); use the config.json the weights were saved with"
        )
    return generation, text


def plan_from_config(config: dict[str, Any], source: str = "config.json") -> GemmaPlan:
    """Build the plan from a config dict in any form transformers 4.x or 5.x writes (see the spec, 4.3 and 5.2)."""
    generation, text = text_config_of(config, source)
    model_type = config["model_type"]
    where = f"{source}" + (" text_config" if text is not config else "")
    unified = model_type in UNIFIED_TYPES
    cfg = _Fields(text, UNIFIED_DEFAULTS if unified else DEFAULTS[generation], where)
    if unified:
        for key, off in UNIFIED_ABSENT.items():
            if text.get(key) not in (None, off):
                raise ConfigError(
                    f"{where}: {key}={text[key]!r}, but {model_type} (Gemma 4 12B) has no per-layer inputs or "
                    f"experts; it must be {off!r} or absent"
                )

    for key in REQUIRED:
        cfg.require(key)
    hidden = cfg.positive_int("hidden_size")
    num_layers = cfg.positive_int("num_hidden_layers")
    num_heads = cfg.positive_int("num_attention_heads")
    num_kv = cfg.positive_int("num_key_value_heads")
    head_dim = cfg.positive_int("head_dim")
    intermediate = cfg.positive_int("intermediate_size")
    vocab = cfg.positive_int("vocab_size")
    window = cfg.positive_int("sliding_window")
    eps = float(cfg.get("rms_norm_eps"))

    if cfg.get("hidden_activation") != "gelu_pytorch_tanh":
        raise ConfigError(
            f"{where}: hidden_activation={cfg.get('hidden_activation')!r} is not supported; Gemma uses "
            "'gelu_pytorch_tanh'"
        )
    if cfg.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not supported (no public Gemma checkpoint has biases)")
    if text.get("use_bidirectional_attention") not in (None, False, "vision"):
        raise ConfigError(
            f"{where}: use_bidirectional_attention={text['use_bidirectional_attention']!r} makes a non-causal "
            "embedding model; only causal LMs are supported"
        )
    if num_heads % num_kv:
        raise ConfigError(
            f"{where}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv}"
        )
    if generation < 4 and hidden % num_heads:
        raise ConfigError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={num_heads}")
    if head_dim % 2:
        raise ConfigError(f"{where}: head_dim={head_dim} must be even for rotary embeddings")

    layer_types = _layer_types(cfg, generation, num_layers, where)
    ropes = _rope_specs(cfg, generation, where, text)

    # Per-layer attention geometry (Gemma 4 global layers have their own head dim and possibly KV heads).
    geometry = {SLIDING: (num_kv, head_dim), FULL: (num_kv, head_dim)}
    k_eq_v = False
    if generation == 4:
        k_eq_v = bool(cfg.get("attention_k_eq_v"))
        geometry[FULL] = _gemma4_full_geometry(cfg, text, layer_types, num_kv, k_eq_v, where)
        gkv, gdim = geometry[FULL]
        if num_heads % gkv:
            raise ConfigError(
                f"{where}: num_attention_heads={num_heads} is not a multiple of the global layers' KV heads ({gkv})"
            )
        if gdim % 2:
            raise ConfigError(f"{where}: global head_dim={gdim} must be even for rotary embeddings")

    kv_sources = list(range(num_layers))
    double_wide: set[int] = set()
    moe = None
    ple_dim, ple_vocab = 0, 0
    if generation == 4:
        kv_sources = _kv_sources(cfg, layer_types, where)
        if cfg.get("use_double_wide_mlp"):
            double_wide = {i for i, src in enumerate(kv_sources) if src != i}
        if cfg.get("enable_moe_block"):
            moe = MoeSpec(
                num_experts=cfg.positive_int("num_experts", why="enable_moe_block is true"),
                top_k=cfg.positive_int("top_k_experts", why="enable_moe_block is true"),
                intermediate_size=cfg.positive_int("moe_intermediate_size", why="enable_moe_block is true"),
            )
            if moe.top_k > moe.num_experts:
                raise ConfigError(f"{where}: top_k_experts={moe.top_k} exceeds num_experts={moe.num_experts}")
        ple_dim = cfg.get("hidden_size_per_layer_input")
        if not isinstance(ple_dim, int) or isinstance(ple_dim, bool) or ple_dim < 0:
            raise ConfigError(
                f"{where}: hidden_size_per_layer_input={ple_dim!r} must be a non-negative integer (0 disables PLE)"
            )
        if ple_dim:
            ple_vocab = cfg.positive_int("vocab_size_per_layer_input")

    layers = []
    for i, layer_type in enumerate(layer_types):
        kv, dim = geometry[layer_type]
        layers.append(
            LayerPlan(
                index=i,
                attention_type=layer_type,
                num_heads=num_heads,
                num_kv_heads=kv,
                head_dim=dim,
                window=window if layer_type == SLIDING else None,
                rope=RopeSpec(head_dim=dim, **ropes[layer_type]),
                kv_source=kv_sources[i],
                k_eq_v=k_eq_v and layer_type == FULL,
                intermediate_size=2 * intermediate if i in double_wide else intermediate,
                moe=moe,
            )
        )

    qpas = None
    attn_cap = None
    if generation < 4:
        qpas = float(cfg.positive_number("query_pre_attn_scalar"))
    if generation == 2:
        attn_cap = cfg.optional_positive_number("attn_logit_softcapping")
    # Gemma 3's attention ignores attn_logit_softcapping and Gemma 4 has none (spec 9.4, 6.8).
    final_cap = cfg.optional_positive_number("final_logit_softcapping")
    if model_type == "gemma3":
        final_cap = None  # Gemma3ForConditionalGeneration does not apply it (spec 4.5)

    eos = cfg.get("eos_token_id")
    if eos is None and text is not config:
        eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))

    return GemmaPlan(
        generation=generation,
        model_type=model_type,
        hidden_size=hidden,
        vocab_size=vocab,
        layers=tuple(layers),
        rms_norm_eps=eps,
        query_pre_attn_scalar=qpas,
        attn_logit_softcap=attn_cap,
        final_logit_softcap=final_cap,
        sliding_window=window,
        max_position_embeddings=cfg.positive_int("max_position_embeddings"),
        tie_word_embeddings=bool(
            config.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
            if text is not config
            else cfg.get("tie_word_embeddings")
        ),
        ple_dim=ple_dim,
        ple_vocab_size=ple_vocab,
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


class _Fields:
    """Field access with HF defaults and errors that name the field."""

    def __init__(self, raw: dict[str, Any], defaults: dict[str, Any], where: str):
        self.raw, self.defaults, self.where = raw, defaults, where

    def get(self, key: str) -> Any:
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        return self.defaults.get(key)

    def require(self, key: str) -> None:
        if self.raw.get(key) is None:
            raise ConfigError(f"{self.where}: missing required field {key!r}; copy the checkpoint's full config.json")

    def positive_int(self, key: str, why: str = "") -> int:
        value = self.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            because = f" ({why})" if why else ""
            raise ConfigError(f"{self.where}: {key}={value!r} must be a positive integer{because}")
        return value

    def positive_number(self, key: str) -> float:
        value = self.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{self.where}: {key}={value!r} must be a positive number")
        return float(value)

    def optional_positive_number(self, key: str) -> float | None:
        return None if self.get(key) is None else self.positive_number(key)


def _layer_types(cfg: _Fields, generation: int, num_layers: int, where: str) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        if generation == 2:
            pattern = 2
        elif generation == 3:
            pattern = cfg.get("sliding_window_pattern")
            if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
                raise ConfigError(f"{where}: sliding_window_pattern={pattern!r} must be a positive integer")
        else:
            pattern = 6
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConfigError(
            f"{where}: layer_types has {len(types) if isinstance(types, list) else types!r} entries but "
            f"num_hidden_layers={num_layers}; give one entry per layer"
        )
    for i, t in enumerate(types):
        if t not in (SLIDING, FULL):
            raise ConfigError(f"{where}: layer_types[{i}]={t!r}; expected {SLIDING!r} or {FULL!r}")
    types = list(types)
    if generation == 4 and types[-1] != FULL:
        # transformers forces the last Gemma 4 layer to full attention (with a warning); so do we.
        warnings.warn(f"{where}: Gemma 4's last layer is always full_attention; overriding layer_types[-1]", stacklevel=3)
        types[-1] = FULL
    return types


def _rope_entry(params: Any, layer_type: str, where: str, theta_default: float | None) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters[{layer_type!r}]={params!r} must be an object")
    kind = params.get("rope_type")
    if kind is None and "type" in params:
        kind = params["type"]
        if kind != "default":
            # transformers 4.x reads the legacy key as the rope type; 5.x's Gemma 3 rope_scaling merge keeps
            # "default" and drops the factor (spec 9.5). We honour what the checkpoint says.
            warnings.warn(
                f"{where}: legacy rope key type={kind!r} read as rope_type={kind!r} (transformers 5 ignores it)",
                stacklevel=4,
            )
    kind = kind or "default"
    theta = params.get("rope_theta", theta_default)
    if theta is None or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"{where}: rope_theta={theta!r} for {layer_type} layers must be a positive number")
    if kind == "default":
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(
                f"{where}: partial_rotary_factor={params['partial_rotary_factor']} with rope_type 'default' "
                f"({layer_type}) is not supported"
            )
        return {"kind": "default", "theta": float(theta)}
    if kind == "linear":
        factor = params.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"{where}: linear RoPE ({layer_type}) needs a positive 'factor', got {factor!r}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor with linear RoPE ({layer_type}) is not supported")
        return {"kind": "linear", "theta": float(theta), "factor": float(factor)}
    if kind == "proportional":
        partial = params.get("partial_rotary_factor", 1.0)
        factor = params.get("factor", 1.0)
        if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise ConfigError(f"{where}: partial_rotary_factor={partial!r} ({layer_type}) must be in (0, 1]")
        return {"kind": "proportional", "theta": float(theta), "factor": float(factor),
                "partial_rotary_factor": float(partial)}
    raise ConfigError(
        f"{where}: rope_type={kind!r} for {layer_type} layers is not supported; Gemma uses 'default', 'linear' "
        "or 'proportional'"
    )


def _rope_specs(cfg: _Fields, generation: int, where: str, text: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer-type RoPE settings from `rope_parameters` or the legacy top-level keys (spec 3.1, 4.3, 5.1)."""
    params = text.get("rope_parameters")
    legacy_scaling = text.get("rope_scaling")
    if generation == 2:
        # One RoPE for every layer: rope_parameters (flat) or legacy rope_theta / rope_scaling.
        if isinstance(params, dict) and (SLIDING in params or FULL in params):
            raise ConfigError(f"{where}: Gemma 2 rope_parameters must be one flat object, not keyed by layer type")
        flat = dict(params or {})
        if legacy_scaling:
            flat = {**legacy_scaling, **flat}
        entry = _rope_entry(flat, "all", where, text.get("rope_theta", 10000.0))
        return {SLIDING: entry, FULL: entry}
    if generation == 3:
        if params is not None and not (isinstance(params, dict) and set(params) <= {SLIDING, FULL}):
            raise ConfigError(
                f"{where}: Gemma 3 rope_parameters must be keyed by 'sliding_attention'/'full_attention', "
                f"got keys {sorted(params) if isinstance(params, dict) else params!r}"
            )
        params = params or {}
        full = dict(params.get(FULL) or {})
        if legacy_scaling:
            full = {**legacy_scaling, **full}
        sliding = dict(params.get(SLIDING) or {})
        return {
            FULL: _rope_entry(full, FULL, where, text.get("rope_theta", 1_000_000.0)),
            SLIDING: _rope_entry(sliding, SLIDING, where, text.get("rope_local_base_freq", 10_000.0)),
        }
    if params is None:
        params = {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
    missing = [t for t in (SLIDING, FULL) if not isinstance(params, dict) or t not in params]
    if missing:
        raise ConfigError(f"{where}: Gemma 4 rope_parameters lacks {missing}; it must be keyed by layer type")
    return {t: _rope_entry(params[t], t, where, None) for t in (SLIDING, FULL)}


def _gemma4_full_geometry(
    cfg: _Fields, text: dict[str, Any], layer_types: list[str], num_kv: int, k_eq_v: bool, where: str
) -> tuple[int, int]:
    """(KV heads, head dim) of Gemma 4 global layers, from global_* keys or a saved per_layer_config (spec 5.2)."""
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        dim = cfg.positive_int("global_head_dim")
        gkv = cfg.get("num_global_key_value_heads") if k_eq_v else None
        if gkv is not None and (not isinstance(gkv, int) or gkv <= 0):
            raise ConfigError(f"{where}: num_global_key_value_heads={gkv!r} must be a positive integer")
        return (gkv or num_kv), dim
    if not isinstance(per_layer, dict):
        raise ConfigError(f"{where}: per_layer_config must be an object keyed by layer index")
    shapes = set()
    for i, t in enumerate(layer_types):
        override = per_layer.get(str(i), per_layer.get(i, {})) or {}
        if not isinstance(override, dict):
            raise ConfigError(f"{where}: per_layer_config[{i}]={override!r} must be an object")
        unknown = set(override) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(f"{where}: per_layer_config[{i}] sets {sorted(unknown)}, which is not supported")
        if t == SLIDING and override:
            raise ConfigError(f"{where}: per_layer_config[{i}] overrides a sliding layer, which is not supported")
        if t == FULL:
            shapes.add((override.get("num_key_value_heads", num_kv), override.get("head_dim", cfg.get("head_dim"))))
    if len(shapes) > 1:
        raise ConfigError(f"{where}: per_layer_config gives global layers different shapes {sorted(shapes)}")
    kv, dim = shapes.pop()
    for name, value in (("num_key_value_heads", kv), ("head_dim", dim)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}: per_layer_config {name}={value!r} must be a positive integer")
    return kv, dim


def _kv_sources(cfg: _Fields, layer_types: list[str], where: str) -> list[int]:
    """Gemma 4 KV sharing: each of the last n layers reads the last unshared layer of its own type (spec 5.4)."""
    num_layers = len(layer_types)
    shared = cfg.get("num_kv_shared_layers")
    if not isinstance(shared, int) or isinstance(shared, bool) or not 0 <= shared < num_layers:
        raise ConfigError(
            f"{where}: num_kv_shared_layers={shared!r} must be an integer in [0, num_hidden_layers={num_layers})"
        )
    first = num_layers - shared
    producer = {t: i for i, t in enumerate(layer_types[:first])}  # last index of each type wins
    sources = list(range(num_layers))
    for i in range(first, num_layers):
        if layer_types[i] not in producer:
            raise ConfigError(
                f"{where}: KV-shared layer {i} is {layer_types[i]} but no earlier unshared layer of that type "
                f"exists (num_kv_shared_layers={shared}); reduce num_kv_shared_layers"
            )
        sources[i] = producer[layer_types[i]]
    return sources


# --------------------------------------------------------------------------------------------------------------
# Gemma 4 assistant drafters (transformers `gemma4_assistant`, checkpoints google/gemma-4-*-it-assistant).

ASSISTANT_MODEL_TYPE = "gemma4_assistant"
TARGET_KV = -1  # LayerPlan.kv_source of an assistant layer: it attends to the target model's K/V


@dataclass(frozen=True)
class AssistantPlan:
    """A Gemma 4 assistant: a small Gemma 4 decoder whose every layer reads the target's K/V (the last unshared
    target layer of the same type), fed cat(target embedding of the last token, target hidden state) through
    `pre_projection`, returning `post_projection(hidden)` as the next hidden state; logits from the tied LM head,
    or, with `ordered_embeddings`, only over the tokens of the `centroid_top_k` best of `num_centroids` clusters."""

    text: GemmaPlan  # every layer has kv_source == TARGET_KV
    backbone_hidden_size: int  # the target's hidden size
    ordered_embeddings: bool
    num_centroids: int
    centroid_top_k: int


def is_assistant_config(config: dict[str, Any]) -> bool:
    return isinstance(config, dict) and config.get("model_type") == ASSISTANT_MODEL_TYPE


def assistant_plan_from_config(config: dict[str, Any], source: str = "config.json") -> AssistantPlan:
    """The plan of a `gemma4_assistant` config dict (transformers 5 Gemma4AssistantConfig and its class defaults)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: model_type {ASSISTANT_MODEL_TYPE!r} needs a 'text_config' object")
    where = f"{source} text_config"
    num_layers = text.get("num_hidden_layers")
    shared = text.get("num_kv_shared_layers")
    if shared not in (None, 0, num_layers):
        raise ConfigError(f"{where}: num_kv_shared_layers={shared!r}; an assistant shares every layer's K/V "
                          f"(num_hidden_layers={num_layers})")
    for key, allowed in (("hidden_size_per_layer_input", 0), ("vocab_size_per_layer_input", 0),
                         ("enable_moe_block", False), ("use_double_wide_mlp", False)):
        if text.get(key, allowed) != allowed:
            raise ConfigError(f"{where}: {key}={text[key]!r}; a Gemma 4 assistant needs {allowed!r}")
    # Parsed as a plain decoder (no sharing), then every layer pointed at the target's K/V.
    base = plan_from_config({**text, "model_type": "gemma4_text", "num_kv_shared_layers": 0,
                             "hidden_size_per_layer_input": 0}, source)
    layers = tuple(dataclasses.replace(layer, kv_source=TARGET_KV) for layer in base.layers)
    fields = _Fields(config, {"backbone_hidden_size": 1536, "use_ordered_embeddings": False, "num_centroids": 2048,
                              "centroid_intermediate_top_k": 32}, source)
    plan = AssistantPlan(
        text=dataclasses.replace(base, model_type=ASSISTANT_MODEL_TYPE, layers=layers,
                                 tie_word_embeddings=bool(config.get("tie_word_embeddings", True))),
        backbone_hidden_size=fields.positive_int("backbone_hidden_size"),
        ordered_embeddings=bool(fields.get("use_ordered_embeddings")),
        num_centroids=fields.positive_int("num_centroids"),
        centroid_top_k=fields.positive_int("centroid_intermediate_top_k"),
    )
    if plan.ordered_embeddings:
        if base.vocab_size % plan.num_centroids:
            raise ConfigError(f"{source}: vocab_size={base.vocab_size} is not a multiple of "
                              f"num_centroids={plan.num_centroids}")
        if plan.centroid_top_k > plan.num_centroids:
            raise ConfigError(f"{source}: centroid_intermediate_top_k={plan.centroid_top_k} exceeds "
                              f"num_centroids={plan.num_centroids}")
    return plan


def target_kv_layers(target: GemmaPlan) -> dict[str, LayerPlan]:
    """layer type -> the target layer whose K/V an assistant reads: the last layer of that type that owns a cache
    before the first KV-shared one (HF's kv_sharing_modes "store" layers)."""
    first_shared = next((layer.index for layer in target.layers if layer.shares_kv), target.num_layers)
    return {layer.attention_type: layer for layer in target.layers[:first_shared]}


def check_assistant_fits(target: GemmaPlan, assistant: AssistantPlan, source: str = "draft") -> None:
    """Refuse an assistant that cannot read this target's K/V, before any weights are loaded."""
    if target.generation != 4:
        raise ConfigError(f"{source}: a Gemma 4 assistant drafts for Gemma 4 targets only (target is Gemma "
                          f"{target.generation})")
    if assistant.backbone_hidden_size != target.hidden_size:
        raise ConfigError(f"{source}: backbone_hidden_size={assistant.backbone_hidden_size} but the target's "
                          f"hidden_size is {target.hidden_size}; use the assistant trained for this target")
    if assistant.text.vocab_size != target.vocab_size:
        raise ConfigError(f"{source}: vocabulary of {assistant.text.vocab_size} tokens, the target has "
                          f"{target.vocab_size}; use the assistant trained for this target")
    producers = target_kv_layers(target)
    for layer in assistant.text.layers:
        source_layer = producers.get(layer.attention_type)
        if source_layer is None:
            raise ConfigError(f"{source}: assistant layer {layer.index} is {layer.attention_type} but the target "
                              "has no unshared layer of that type")
        if (layer.num_kv_heads, layer.head_dim) != (source_layer.num_kv_heads, source_layer.head_dim):
            raise ConfigError(
                f"{source}: assistant layer {layer.index} expects {layer.num_kv_heads} KV heads of dim "
                f"{layer.head_dim}, the target's {layer.attention_type} K/V (layer {source_layer.index}) has "
                f"{source_layer.num_kv_heads} of dim {source_layer.head_dim}"
            )
