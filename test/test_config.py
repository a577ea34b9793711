"""config.json -> GemmaPlan, in every form transformers 4 and 5 write, checked against what HF's config classes
derive (layer schedule, RoPE per layer type, KV-sharing sources, MLP widths), plus logits for the legacy forms,
and one-line ConfigErrors naming the field for bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
import transformers
from conftest import (
    FLOOR,
    GEMMA2_TINY,
    GEMMA3_TINY,
    GEMMA4_TINY_ALL,
    GEMMA4_TINY_E,
    GEMMA4_TINY_MOE,
    GEMMA4_UNIFIED_TINY,
    build_hf_model,
    hf_config,
    hf_logits,
    make_prompt,
    max_diff,
    report,
    save_hf,
)

from nxdi_gemma.config import FULL, SLIDING, load_plan, plan_from_config
from nxdi_gemma.cpu import KVCache, load_model
from nxdi_gemma.errors import ConfigError

S, F = SLIDING, FULL


def with_type(model_type: str, d: dict) -> dict:
    return {"model_type": model_type, **copy.deepcopy(d)}


def plan_rope(plan) -> dict:
    """{layer type: (kind, theta, factor)} as the plan sees it."""
    out = {}
    for layer in plan.layers:
        r = layer.rope
        out.setdefault(layer.attention_type, (r.kind, r.theta, r.factor))
        assert out[layer.attention_type] == (r.kind, r.theta, r.factor), "one RoPE per layer type"
    return out


def hf_rope(hf_cfg, per_type: bool = True) -> dict:
    params = hf_cfg.rope_parameters
    out = {}
    for t in set(hf_cfg.layer_types):
        p = params[t] if per_type else params
        out[t] = (p["rope_type"], float(p["rope_theta"]), float(p.get("factor", 1.0)))
    return out


def assert_plan_matches_hf(plan, hf_cfg, per_type_rope: bool = True) -> None:
    """Field-by-field: what HF derives from a config vs our plan."""
    assert list(plan.layer_types) == list(hf_cfg.layer_types)
    assert plan_rope(plan) == hf_rope(hf_cfg, per_type_rope)
    assert plan.hidden_size == hf_cfg.hidden_size
    assert plan.vocab_size == hf_cfg.vocab_size
    assert plan.num_layers == hf_cfg.num_hidden_layers
    assert plan.rms_norm_eps == hf_cfg.rms_norm_eps
    assert plan.sliding_window == hf_cfg.sliding_window
    assert all(layer.window == (hf_cfg.sliding_window if layer.is_sliding else None) for layer in plan.layers)
    if plan.generation < 4:
        assert plan.num_heads == hf_cfg.num_attention_heads
        assert {layer.num_kv_heads for layer in plan.layers} == {hf_cfg.num_key_value_heads}
        assert {layer.head_dim for layer in plan.layers} == {hf_cfg.head_dim}
        assert plan.query_pre_attn_scalar == hf_cfg.query_pre_attn_scalar
        assert {layer.intermediate_size for layer in plan.layers} == {hf_cfg.intermediate_size}


def tiny_logits_match(tmp_path, model_type: str, hf_kwargs: dict, disk_config: dict, name: str) -> float:
    """Build HF from `hf_kwargs`, save, replace config.json by `disk_config` (the form under test), load ours,
    compare prefill logits on a 24-token prompt."""
    hf = build_hf_model(model_type, hf_kwargs, seed=5)
    path = save_hf(hf, tmp_path / name)
    (path / "config.json").write_text(json.dumps(disk_config))
    ours = load_model(path, progress=False)
    prompt = make_prompt(24, disk_config["vocab_size"], seed=2)
    cache = KVCache.allocate(ours.plan, 1, 24, ours.dtype)
    logits = ours.forward_step(torch.tensor([prompt]), cache, torch.zeros(1, dtype=torch.long), last_only=False)
    diff = max_diff(logits[0], hf_logits(hf, torch.tensor([prompt]))[0])
    report(f"config/{name}", f"prefill max|ours - HF| = {diff:.2e}")
    return diff


# --------------------------------------------------------------------------------------------------------------
# Gemma 2


def test_gemma2_flat_rope_parameters():
    plan = plan_from_config(with_type("gemma2", GEMMA2_TINY))
    assert_plan_matches_hf(plan, transformers.Gemma2Config(**GEMMA2_TINY), per_type_rope=False)
    assert plan.layer_types == (S, F, S, F)
    assert plan.attn_logit_softcap == 2.0 and plan.final_logit_softcap == 1.0
    assert plan.attention_scale == 24**-0.5


def test_gemma2_legacy_rope_theta(tmp_path):
    legacy = {k: v for k, v in GEMMA2_TINY.items() if k != "rope_parameters"}
    legacy.update(rope_theta=5000.0, sliding_window_size=8, hidden_act="gelu_pytorch_tanh")
    plan = plan_from_config(with_type("gemma2", legacy))
    hf_cfg = transformers.Gemma2Config(**legacy)
    assert_plan_matches_hf(plan, hf_cfg, per_type_rope=False)
    assert plan_rope(plan) == {S: ("default", 5000.0, 1.0), F: ("default", 5000.0, 1.0)}
    assert tiny_logits_match(tmp_path, "gemma2", legacy, with_type("gemma2", legacy), "gemma2-legacy") <= FLOOR


def test_gemma2_defaults_for_omitted_fields():
    plan = plan_from_config({"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                             "num_hidden_layers": 26})  # fmt: skip
    hf_cfg = transformers.Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26)
    assert_plan_matches_hf(plan, hf_cfg, per_type_rope=False)
    assert plan.attn_logit_softcap == 50.0 and plan.final_logit_softcap == 30.0


# --------------------------------------------------------------------------------------------------------------
# Gemma 3

GEMMA3_LEGACY_TINY = {
    **{k: v for k, v in GEMMA3_TINY.items() if k not in ("layer_types", "rope_parameters")},
    "num_hidden_layers": 6, "sliding_window_pattern": 3, "rope_theta": 500000.0, "rope_local_base_freq": 20000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
}  # fmt: skip


def test_gemma3_new_form():
    plan = plan_from_config(with_type("gemma3_text", GEMMA3_TINY))
    assert_plan_matches_hf(plan, transformers.Gemma3TextConfig(**GEMMA3_TINY))
    assert plan_rope(plan) == {S: ("default", 10000.0, 1.0), F: ("linear", 1e6, 8.0)}
    assert plan.attn_logit_softcap is None  # Gemma 3 has none (the config field is ignored by HF)


def test_gemma3_new_form_logits(tmp_path):
    disk = with_type("gemma3_text", GEMMA3_TINY)
    assert tiny_logits_match(tmp_path, "gemma3_text", GEMMA3_TINY, disk, "gemma3-new") <= FLOOR


def test_gemma3_legacy_form_matches_hf_derivation_and_logits(tmp_path):
    disk = with_type("gemma3_text", GEMMA3_LEGACY_TINY)
    plan = plan_from_config(disk)
    hf_cfg = transformers.Gemma3TextConfig(**GEMMA3_LEGACY_TINY)
    assert_plan_matches_hf(plan, hf_cfg)
    assert plan.layer_types == (S, S, F, S, S, F)
    assert plan_rope(plan) == {S: ("default", 20000.0, 1.0), F: ("linear", 500000.0, 8.0)}
    assert tiny_logits_match(tmp_path, "gemma3_text", GEMMA3_LEGACY_TINY, disk, "gemma3-legacy") <= FLOOR


def test_gemma3_new_and_legacy_forms_give_the_same_plan():
    legacy = with_type("gemma3_text", GEMMA3_LEGACY_TINY)
    hf_cfg = transformers.Gemma3TextConfig(**GEMMA3_LEGACY_TINY)
    new = with_type("gemma3_text", {k: v for k, v in GEMMA3_LEGACY_TINY.items()
                                    if k not in ("sliding_window_pattern", "rope_theta", "rope_local_base_freq",
                                                 "rope_scaling")})  # fmt: skip
    new.update(layer_types=list(hf_cfg.layer_types), rope_parameters=copy.deepcopy(hf_cfg.rope_parameters))
    assert plan_from_config(new) == plan_from_config(legacy)


def test_gemma3_config_saved_by_hf_gives_the_same_plan(tmp_path):
    """transformers 5 writes layer_types + nested rope_parameters (+ `_sliding_window_pattern`)."""
    transformers.Gemma3TextConfig(**GEMMA3_LEGACY_TINY).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" in saved and "rope_scaling" not in saved
    assert load_plan(tmp_path) == plan_from_config(with_type("gemma3_text", GEMMA3_LEGACY_TINY))


def test_gemma3_multimodal_sparse_text_config_takes_hf_defaults():
    """The real gemma-3-4b-it text_config: everything else comes from Gemma3TextConfig's defaults."""
    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}  # fmt: skip
    plan = plan_from_config({"model_type": "gemma3", "text_config": text, "vision_config": {}})
    hf_text = transformers.Gemma3Config(text_config=dict(text)).text_config
    assert_plan_matches_hf(plan, hf_text)
    assert plan.vocab_size == 262208 and plan.num_heads == 8 and plan.layers[0].num_kv_heads == 4
    assert plan.layers[0].head_dim == 256 and plan.query_pre_attn_scalar == 256
    assert [i for i, t in enumerate(plan.layer_types) if t == F] == [5, 11, 17, 23, 29]
    assert plan_rope(plan) == {S: ("default", 10000.0, 1.0), F: ("linear", 1e6, 8.0)}
    assert plan.final_logit_softcap is None  # Gemma3ForConditionalGeneration never applies it


def test_gemma3_multimodal_ignores_final_softcap_like_hf():
    text = dict(GEMMA3_TINY, final_logit_softcapping=1.0)
    assert plan_from_config(with_type("gemma3_text", text)).final_logit_softcap == 1.0
    assert plan_from_config({"model_type": "gemma3", "text_config": text}).final_logit_softcap is None


def test_legacy_rope_type_key_is_read_as_transformers_4_did():
    """`{"type": "linear", "factor": 8}` (key `type`, not `rope_type`): transformers 4 applied linear x8, transformers
    5.23 silently falls back to default RoPE (spec 9.5). Our plan follows what the checkpoint says (transformers 4
    semantics, the version such configs were written for) and warns."""
    text = dict(GEMMA3_LEGACY_TINY, rope_scaling={"type": "linear", "factor": 8.0})
    with pytest.warns(UserWarning, match="type"):
        plan = plan_from_config(with_type("gemma3_text", text))
    assert plan_rope(plan)[F] == ("linear", 500000.0, 8.0)
    hf_full = transformers.Gemma3TextConfig(**text).rope_parameters[F]
    report("config/legacy rope 'type' key", f"ours: linear x8; transformers {transformers.__version__}: {hf_full}")


# --------------------------------------------------------------------------------------------------------------
# Gemma 4


@pytest.mark.parametrize("fixture", [GEMMA4_TINY_ALL, GEMMA4_TINY_E, GEMMA4_TINY_MOE], ids=["all", "e", "moe"])
def test_gemma4_global_keys_and_saved_per_layer_config_give_the_same_plan(tmp_path, fixture):
    transformers.Gemma4TextConfig(**fixture).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in saved and "global_head_dim" not in saved
    ours = plan_from_config(with_type("gemma4_text", fixture))
    assert load_plan(tmp_path) == ours
    # and the geometry is what HF derives per layer
    hf_cfg = transformers.Gemma4TextConfig(**fixture)
    for layer in ours.layers:
        per_layer = hf_cfg.per_layer_config[layer.index]
        assert (layer.head_dim, layer.num_kv_heads) == (per_layer.head_dim, per_layer.num_key_value_heads)


def test_gemma4_multimodal_saved_config_gives_the_text_plan(tmp_path):
    hf_config("gemma4", GEMMA4_TINY_ALL).save_pretrained(tmp_path)
    plan = load_plan(tmp_path)
    text_plan = plan_from_config(with_type("gemma4_text", GEMMA4_TINY_ALL))
    assert plan.model_type == "gemma4"
    assert plan.layers == text_plan.layers and plan.final_logit_softcap == 1.0 and plan.ple_dim == 8


def test_gemma4_geometry_and_features():
    plan = plan_from_config(with_type("gemma4_text", GEMMA4_TINY_ALL))
    full = [layer for layer in plan.layers if not layer.is_sliding]
    assert {(layer.head_dim, layer.num_kv_heads, layer.k_eq_v) for layer in full} == {(32, 1, True)}
    assert {(layer.head_dim, layer.num_kv_heads, layer.k_eq_v) for layer in plan.layers if layer.is_sliding} == {
        (16, 2, False)
    }
    assert plan.attention_scale == 1.0 and plan.final_logit_softcap == 1.0
    assert [layer.kv_source for layer in plan.layers] == [0, 1, 2, 3, 3, 2]
    assert [layer.intermediate_size for layer in plan.layers] == [96, 96, 96, 96, 192, 192]
    rope = plan.layers[2].rope
    assert (rope.kind, rope.rotated_pairs, rope.head_dim) == ("proportional", 4, 32)
    inv = rope.inv_freq()
    assert inv.shape == (16,) and bool((inv[4:] == 0).all())
    assert torch.allclose(inv[:4], 1e6 ** (-torch.arange(0, 8, 2, dtype=torch.float32) / 32))
    # num_global_key_value_heads is ignored without K=V (spec 9.7)
    plan_e = plan_from_config(with_type("gemma4_text", dict(GEMMA4_TINY_E, num_global_key_value_heads=1)))
    assert {layer.num_kv_heads for layer in plan_e.layers} == {2}


def hf_kv_sources(hf_cfg) -> list[int]:
    """Each layer's KV source from HF's kv_sharing_modes: a "reuse" layer reads the "store" layer of its type."""
    modes, types = hf_cfg.kv_sharing_modes, hf_cfg.layer_types
    store = {types[i]: i for i, m in enumerate(modes) if m == "store"}
    return [store[types[i]] if m == "reuse" else i for i, m in enumerate(modes)]


def e_like(layers: int, shared: int, period: int) -> dict:
    return dict(
        GEMMA4_TINY_E, num_hidden_layers=layers, num_kv_shared_layers=shared,
        layer_types=[F if (i + 1) % period == 0 else S for i in range(layers)],
    )  # fmt: skip


@pytest.mark.parametrize(
    "layers, shared, period, sliding_src, full_src", [(35, 20, 5, 13, 14), (42, 18, 6, 22, 23)], ids=["E2B", "E4B"]
)
def test_gemma4_kv_sharing_sources(layers, shared, period, sliding_src, full_src):
    cfg = e_like(layers, shared, period)
    plan = plan_from_config(with_type("gemma4_text", cfg))
    first = layers - shared
    assert [layer.index for layer in plan.layers if layer.shares_kv] == list(range(first, layers))
    for layer in plan.layers[first:]:
        assert layer.kv_source == (sliding_src if layer.is_sliding else full_src)
    assert [layer.kv_source for layer in plan.layers] == hf_kv_sources(transformers.Gemma4TextConfig(**cfg))
    assert len(plan.kv_producers) == first


def test_gemma4_double_wide_mlp_widths_match_hf():
    cfg = e_like(35, 20, 5)
    plan = plan_from_config(with_type("gemma4_text", cfg))
    with torch.device("meta"):
        hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**cfg))
    hf_widths = [layer.mlp.gate_proj.out_features for layer in hf.model.layers]
    assert [layer.intermediate_size for layer in plan.layers] == hf_widths
    assert hf_widths == [96] * 15 + [192] * 20
    narrow = plan_from_config(with_type("gemma4_text", dict(cfg, use_double_wide_mlp=False)))
    assert {layer.intermediate_size for layer in narrow.layers} == {96}


def test_gemma4_last_layer_forced_full():
    cfg = dict(GEMMA4_TINY_MOE, layer_types=[S, F, S])
    with pytest.warns(UserWarning, match="full_attention"):
        plan = plan_from_config(with_type("gemma4_text", cfg))
    assert plan.layer_types == (S, F, F)
    assert list(plan.layer_types) == transformers.Gemma4TextConfig(**cfg).layer_types


def test_gemma4_default_schedule_matches_hf():
    cfg = {k: v for k, v in GEMMA4_TINY_MOE.items() if k != "layer_types"}
    cfg["num_hidden_layers"] = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_from_config(with_type("gemma4_text", cfg))
    assert list(plan.layer_types) == transformers.Gemma4TextConfig(**cfg).layer_types  # S*5, F, S, F(forced)


def test_gemma4_ple_default_is_on_like_hf():
    cfg = {k: v for k, v in GEMMA4_TINY_MOE.items() if k != "hidden_size_per_layer_input"}
    plan = plan_from_config(with_type("gemma4_text", cfg))
    assert plan.ple_dim == transformers.Gemma4TextConfig(**cfg).hidden_size_per_layer_input == 256


# --------------------------------------------------------------------------------------------------------------
# Gemma 4 12B (gemma4_unified / gemma4_unified_text)


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_gemma4_unified_saved_config_gives_hfs_geometry(tmp_path, multimodal):
    """The config.json HF 5.25 writes (per_layer_config form; nested under text_config for the multimodal class)
    plans the decoder HF builds: per-layer head dims and KV heads, K=V global layers, no PLE / MoE / sharing."""
    if multimodal:
        hf_config("gemma4_unified", GEMMA4_UNIFIED_TINY).save_pretrained(tmp_path)
    else:
        transformers.Gemma4UnifiedTextConfig(**GEMMA4_UNIFIED_TINY).save_pretrained(tmp_path)
    plan = load_plan(tmp_path)
    text_plan = plan_from_config(with_type("gemma4_unified_text", GEMMA4_UNIFIED_TINY))
    assert plan == dataclasses.replace(text_plan, model_type="gemma4_unified" if multimodal else "gemma4_unified_text")
    hf_cfg = transformers.Gemma4UnifiedTextConfig(**GEMMA4_UNIFIED_TINY)
    assert_plan_matches_hf(plan, hf_cfg)
    with torch.device("meta"):
        hf = transformers.Gemma4UnifiedForCausalLM(hf_cfg)
    for layer, hf_layer in zip(plan.layers, hf.model.layers, strict=True):
        attn = hf_layer.self_attn
        assert (layer.head_dim, layer.num_kv_heads) == (attn.head_dim, attn.k_proj.out_features // attn.head_dim)
        assert layer.k_eq_v == (attn.v_proj is None)
        assert layer.intermediate_size == hf_layer.mlp.gate_proj.out_features
    assert plan.ple_dim == 0 and all(layer.moe is None and not layer.shares_kv for layer in plan.layers)
    assert plan.attention_scale == 1.0 and plan.final_logit_softcap == 1.0 and not plan.norm_adds_one


def test_gemma4_12b_public_config_is_hfs_geometry():
    """public_models' gemma-4-12b (the published text_config) planned as HF 5.25 builds it: 48 layers, every 6th
    full; sliding 8 KV heads x 256, full 1 KV head x 512 with K=V; 16 query heads; no PLE / MoE / sharing."""
    from nxdi_gemma.public_models import public_config, public_plan

    plan = public_plan("gemma-4-12b")
    hf_cfg = transformers.Gemma4UnifiedConfig(**public_config("gemma-4-12b")).text_config
    assert_plan_matches_hf(plan, hf_cfg)
    for layer in plan.layers:
        per_layer = hf_cfg.per_layer_config[layer.index]
        assert (layer.head_dim, layer.num_kv_heads) == (per_layer.head_dim, per_layer.num_key_value_heads)
    assert {(lay.is_sliding, lay.num_kv_heads, lay.head_dim, lay.k_eq_v) for lay in plan.layers} == {
        (True, 8, 256, False), (False, 1, 512, True)}
    assert sum(not layer.is_sliding for layer in plan.layers) == 8 and plan.num_heads == 16
    assert (plan.hidden_size, plan.layers[0].intermediate_size, plan.vocab_size) == (3840, 15360, 262144)
    assert plan.final_logit_softcap == 30.0 and plan.ple_dim == 0 and plan.tie_word_embeddings
    assert not any(layer.moe or layer.shares_kv for layer in plan.layers)


def test_gemma4_unified_defaults_are_hfs():
    """Fields the 12B's own config class defaults differently from Gemma 4's (window, positions, PLE, MoE)."""
    sparse = {k: v for k, v in GEMMA4_UNIFIED_TINY.items()
              if k not in ("sliding_window", "max_position_embeddings", "layer_types")}
    plan = plan_from_config(with_type("gemma4_unified_text", sparse))
    hf_cfg = transformers.Gemma4UnifiedTextConfig(**sparse)
    assert (plan.sliding_window, plan.max_position_embeddings) == (hf_cfg.sliding_window,
                                                                   hf_cfg.max_position_embeddings) == (1024, 262144)
    assert list(plan.layer_types) == hf_cfg.layer_types
    assert plan.ple_dim == 0 and plan.layers[0].moe is None


# --------------------------------------------------------------------------------------------------------------
# Bad input: one-line ConfigError naming the field.


def bad(base: dict, **changes) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()
G2 = with_type("gemma2", GEMMA2_TINY)
G3 = with_type("gemma3_text", GEMMA3_TINY)
G4 = with_type("gemma4_text", GEMMA4_TINY_ALL)
G4U = with_type("gemma4_unified_text", GEMMA4_UNIFIED_TINY)

# fmt: off
BAD_CONFIGS = {
    "unknown model_type": (bad(G2, model_type="llama"), "model_type"),
    "missing model_type": (bad(G2, model_type=_DROP), "model_type"),
    "missing hidden_size": (bad(G3, hidden_size=_DROP), "hidden_size"),
    "missing hidden_size (multimodal)": ({"model_type": "gemma3", "text_config": bad(G3, hidden_size=_DROP)},
                                         "hidden_size"),
    "heads not a multiple of kv heads": (bad(G2, num_attention_heads=6, num_key_value_heads=4),
                                         "num_key_value_heads"),
    "odd head_dim": (bad(G3, head_dim=15), "head_dim"),
    "unsupported rope_type": (bad(G2, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
                              "rope_type"),
    "unsupported rope_type (gemma3 full)": (bad(G3, rope_parameters={
        S: {"rope_type": "default", "rope_theta": 1e4}, F: {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0},
    }), "rope_type"),
    "layer_types wrong length": (bad(G3, layer_types=[S, F]), "layer_types"),
    "layer_types wrong length (gemma4)": (bad(G4, layer_types=[S, F, F]), "layer_types"),
    "layer_types unknown entry": (bad(G3, layer_types=[S, S, "chunked_attention", S]), "layer_types"),
    "global kv heads do not divide heads": (bad(G4, num_global_key_value_heads=3), "KV heads"),
    "kv sharing without producer": (bad(G4, num_kv_shared_layers=5), "num_kv_shared_layers"),
    "non-integer hidden_size": (bad(G2, hidden_size="64"), "hidden_size"),
    "gemma4_unified without text_config": ({"model_type": "gemma4_unified"}, "text_config"),
    "gemma4_unified missing hidden_size": ({"model_type": "gemma4_unified", "text_config": bad(G4U, hidden_size=_DROP)},
                                           "hidden_size"),
    "gemma4_unified with a gemma4_text decoder": ({"model_type": "gemma4_unified", "text_config": G4}, "gemma4_text"),
    "gemma4_unified with PLE": (bad(G4U, hidden_size_per_layer_input=8), "hidden_size_per_layer_input"),
    "gemma4_unified with MoE": ({"model_type": "gemma4_unified", "text_config": bad(G4U, enable_moe_block=True)},
                                "enable_moe_block"),
}
# fmt: on


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_raises_one_line_error_naming_the_field(name):
    config, field = BAD_CONFIGS[name]
    with pytest.raises(ConfigError) as err:
        plan_from_config(config)
    message = str(err.value)
    assert "\n" not in message, message
    assert field in message, message


def test_load_plan_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config.json") as err:
        load_plan(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON") as err:
        load_plan(tmp_path)
    assert "\n" not in str(err.value)
