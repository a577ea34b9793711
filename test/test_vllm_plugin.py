"""The vLLM plugin (nxdi_gemma.neuron.vllm_plugin) and the vLLM example scripts, without NxDI and without vLLM.

Registration functions are exercised on plain dicts, fake register callables and fake modules; the real
AutoConfig.register is never called (it would change transformers for the other tests).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from nxdi_gemma.config import plan_from_config
from nxdi_gemma.neuron import vllm_plugin
from nxdi_gemma.public_models import public_config

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "scripts" / "serve_vllm.sh"
OFFLINE = ROOT / "scripts" / "offline_inference.py"

MULTIMODAL = ("gemma-3-4b", "gemma-3-27b", "gemma-4-e2b", "gemma-4-26b-a4b", "gemma-4-31b", "gemma-4-12b")


class Dummy:
    pass


class Other:
    pass


def expected_fields(name: str) -> dict:
    plan = plan_from_config(public_config(name))
    return {"hidden_size": plan.hidden_size, "num_key_value_heads": plan.layers[0].num_kv_heads,
            "head_dim": plan.layers[0].head_dim, "vocab_size": plan.vocab_size,
            "num_hidden_layers": plan.num_layers, "num_attention_heads": plan.num_heads}


def write_checkpoint(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(public_config(name)))
    return directory


# ------------------------------------------------------------------------------------------------- NxDI MODEL_TYPES


def test_register_models_maps_every_gemma_key():
    model_types: dict = {}
    vllm_plugin.register_models(model_types, Dummy)
    assert set(model_types) == set(vllm_plugin.GEMMA_MODEL_KEYS) | {"gemma4unified"}
    assert set(vllm_plugin.GEMMA_MODEL_KEYS) == {"gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text",
                                                 "gemma4_unified", "gemma4_unified_text"}
    assert all(entry == {"causal-lm": Dummy} for entry in model_types.values())


def test_register_models_replaces_upstream_gemma3_and_leaves_other_models_alone():
    upstream_gemma3 = {"causal-lm": Other, "image-encoding": Other}
    llama = {"causal-lm": Other}
    model_types = {"llama": llama, "gemma3": upstream_gemma3}
    vllm_plugin.register_models(model_types, Dummy)
    assert model_types["gemma3"] == {"causal-lm": Dummy, "image-encoding": Other}  # other tasks kept
    assert upstream_gemma3 == {"causal-lm": Other, "image-encoding": Other}  # the old entry is not mutated
    assert model_types["llama"] is llama and llama == {"causal-lm": Other}
    vllm_plugin.register_models(model_types, Dummy)  # idempotent (vLLM calls register() in every process)
    assert model_types["gemma3"] == {"causal-lm": Dummy, "image-encoding": Other}


# -------------------------------------------- multimodal checkpoints: hf_overrides instead of NEURON_MULTI_MODAL_MODELS


@pytest.mark.parametrize("name", MULTIMODAL)
def test_hf_overrides_of_multimodal_configs_are_the_plan_text_fields(name):
    expected = expected_fields(name)
    overrides = vllm_plugin.hf_overrides_for(public_config(name))
    assert overrides == {"num_key_value_heads": expected["num_key_value_heads"], "head_dim": expected["head_dim"]}


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-1b"])
def test_hf_overrides_of_text_only_configs_are_empty(name):
    assert vllm_plugin.hf_overrides_for(public_config(name)) == {}


def test_checkpoint_hf_overrides_and_command_line(tmp_path, capsys):
    model = write_checkpoint(tmp_path / "gemma-3-27b", "gemma-3-27b")
    assert vllm_plugin.checkpoint_hf_overrides(model) == {"num_key_value_heads": 16, "head_dim": 128}
    assert vllm_plugin.main([str(model)]) == 0
    assert json.loads(capsys.readouterr().out) == {"num_key_value_heads": 16, "head_dim": 128}
    assert vllm_plugin.main([str(tmp_path / "missing")]) == 2
    assert "config.json: no config.json" in capsys.readouterr().err
    assert vllm_plugin.main([]) == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    assert vllm_plugin.main([str(tmp_path / "broken")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- transformers config classes


class _Gemma3TextConfig457:
    """Stands for transformers 4.57's Gemma3TextConfig: legacy RoPE keywords, no rope_parameters."""

    def __init__(self, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None, **kwargs):
        pass


class _Gemma3TextConfig5:
    def __init__(self, rope_parameters=None, **kwargs):
        pass


def test_register_configs_under_transformers_457():
    calls: list[tuple[str, type, bool]] = []
    mapping_457 = {"gemma": Other, "gemma2": Other, "gemma3": Other, "gemma3_text": _Gemma3TextConfig457,
                   "llama": Other}  # no Gemma 4; Gemma 3 classes without rope_parameters
    added = vllm_plugin.register_configs(lambda t, cls, exist_ok=False: calls.append((t, cls, exist_ok)), mapping_457)
    g4 = ["gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text"]
    assert [t for t, _, _ in calls] == ["gemma3", "gemma3_text", *g4]
    assert all(exist_ok for _, _, exist_ok in calls)
    assert added == [cls for _, cls, _ in calls]
    pytest.importorskip("transformers")
    assert added == [vllm_plugin.gemma3_rope_config_class("gemma3"), vllm_plugin.gemma3_rope_config_class("gemma3_text"),
                     *map(vllm_plugin.gemma_config_class, g4)]
    assert [cls.model_type for cls in added] == ["gemma3", "gemma3_text", *g4]
    # A second call (vLLM runs register() in every process, sometimes twice) finds our classes and re-registers none,
    # but still returns them (their tokenizer mapping is re-applied).
    mapping_457.update({t: cls for t, cls, _ in calls})
    assert vllm_plugin.register_configs(lambda *a, **k: pytest.fail(f"registered {a}"), mapping_457) == added


def test_register_configs_registers_nothing_under_transformers_5():
    mapping_5 = {t: Other for t in vllm_plugin.GEMMA_MODEL_KEYS} | {"gemma3_text": _Gemma3TextConfig5}
    assert vllm_plugin.register_configs(lambda *a, **k: pytest.fail(f"registered {a}"), mapping_5) == []
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if int(transformers.__version__.split(".")[0]) >= 5:  # the installed transformers itself needs nothing
        assert vllm_plugin.register_configs(lambda *a, **k: pytest.fail(f"registered {a}"), CONFIG_MAPPING) == []


def test_register_tokenizers_maps_our_configs_to_the_gemma_tokenizer():
    calls: list[tuple[type, dict]] = []
    vllm_plugin.register_tokenizers(lambda cls, **kw: calls.append((cls, kw)), [Dummy, Other], (int, str))
    assert calls == [(Dummy, {"exist_ok": True, "slow_tokenizer_class": int, "fast_tokenizer_class": str}),
                     (Other, {"exist_ok": True, "slow_tokenizer_class": int, "fast_tokenizer_class": str})]
    calls.clear()
    vllm_plugin.register_tokenizers(lambda cls, **kw: calls.append((cls, kw)), [Dummy], float)  # transformers 5
    assert calls == [(Dummy, {"exist_ok": True, "tokenizer_class": float})]


@pytest.mark.parametrize("kind", ["tiny", "gemma-3-1b", "gemma-3-27b"])
def test_gemma3_rope_class_gives_transformers_the_same_rope(kind):
    """The legacy fields our Gemma 3 class writes for transformers 4.x read back, in transformers 5's own
    conversion of those fields, as exactly the rope_parameters of the original config."""
    transformers = pytest.importorskip("transformers")
    if not vllm_plugin.reads_layer_typed_rope(transformers.Gemma3TextConfig):
        pytest.skip("needs transformers 5 as the reference")
    from nxdi_gemma.tiny import TINY_CONFIGS

    raw = dict(TINY_CONFIGS["gemma3"]) if kind == "tiny" else public_config(kind)
    text = raw.get("text_config", raw)
    legacy = vllm_plugin.legacy_rope_fields(text)
    if "rope_parameters" in text:
        assert "rope_parameters" not in legacy and {"rope_theta", "rope_local_base_freq", "rope_scaling"} <= set(legacy)
    else:
        assert legacy is text  # Hub-style configs pass unchanged
    want = transformers.Gemma3TextConfig(**text).rope_parameters
    assert transformers.Gemma3TextConfig(**legacy).rope_parameters == want
    ours = vllm_plugin.gemma3_rope_config_class("gemma3_text")(**text)
    assert ours.rope_parameters == want
    assert type(pickle.loads(pickle.dumps(ours))) is type(ours)  # vLLM sends hf_config to its other processes
    multimodal = vllm_plugin.gemma3_rope_config_class("gemma3")(text_config=dict(text))
    assert isinstance(multimodal, transformers.Gemma3Config)  # vLLM's Gemma 3 processor checks this
    assert multimodal.text_config.rope_parameters == want


def test_register_configs_registers_nothing_when_all_are_known():
    def refuse(model_type, cls, exist_ok=False):
        raise AssertionError(f"registered {model_type}")

    known = {t: Other for t in vllm_plugin.GEMMA_MODEL_KEYS} | {"gemma3_text": _Gemma3TextConfig5, "llama": Other}
    assert vllm_plugin.register_configs(refuse, known) == []


def test_register_architectures_registers_the_stand_in_for_missing_ones():
    calls: list[tuple[str, str]] = []
    supported = {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "LlamaForCausalLM"}
    added = vllm_plugin.register_architectures(lambda arch, cls: calls.append((arch, cls)), supported)
    assert added == ["Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForCausalLM",
                     "Gemma4UnifiedForConditionalGeneration"]
    assert calls == [(arch, vllm_plugin.VLLM_STAND_IN) for arch in added]
    assert vllm_plugin.register_architectures(lambda *a: pytest.fail("registered"), vllm_plugin.GEMMA_ARCHITECTURES) == []


@pytest.mark.parametrize("name", MULTIMODAL)
def test_config_class_exposes_the_text_fields_of_multimodal_configs(name):
    pytest.importorskip("transformers")
    raw = public_config(name)
    assert "num_key_value_heads" not in raw and "head_dim" not in raw  # nested under text_config only
    config = vllm_plugin.gemma_config_class(raw["model_type"])(**public_config(name))
    expected = expected_fields(name)
    for key in ("num_key_value_heads", "head_dim", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config, key) == expected[key], key
    text = config.get_text_config()
    assert text is not config and text.model_type == raw["model_type"] + "_text"
    assert text.vocab_size == expected["vocab_size"]
    assert text.num_key_value_heads == expected["num_key_value_heads"] and text.head_dim == expected["head_dim"]
    for key in vllm_plugin.TEXT_FIELDS:
        assert getattr(text, key) is not None, key
    saved = config.to_dict()
    assert set(raw) <= set(saved)  # every key kept
    assert saved["architectures"] == raw["architectures"]
    if raw["model_type"].startswith("gemma4"):  # (transformers 5 rewrites Gemma 3's legacy rope keys, as for every config)
        assert set(raw["text_config"]) <= set(saved["text_config"])


@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")
def test_config_class_keeps_unknown_keys_and_text_only_configs_are_their_own_text_config():
    pytest.importorskip("transformers")
    raw = dict(public_config("gemma-4-e2b"), vision_config={"model_type": "gemma4_vision", "hidden_size": 768},
               image_token_id=262145)
    config = vllm_plugin.gemma_config_class("gemma4")(**raw)
    assert config.vision_config == {"model_type": "gemma4_vision", "hidden_size": 768}
    assert config.image_token_id == 262145
    text_only = vllm_plugin.gemma_config_class("gemma3_text")(**public_config("gemma-3-1b"))
    assert text_only.get_text_config() is text_only
    assert text_only.num_key_value_heads == 1 and text_only.vocab_size == 262144
    assert vllm_plugin.gemma_config_class("gemma4")().get_text_config() is not None  # no-argument construction


def test_config_class_from_pretrained_and_pickle(tmp_path):
    pytest.importorskip("transformers")
    model = write_checkpoint(tmp_path / "gemma-4-31b", "gemma-4-31b")
    cls = vllm_plugin.gemma_config_class("gemma4")
    assert vllm_plugin.gemma_config_class("gemma4") is cls and vllm_plugin.Gemma4CompatConfig is cls
    config = cls.from_pretrained(model)
    expected = expected_fields("gemma-4-31b")
    assert (config.num_key_value_heads, config.head_dim) == (expected["num_key_value_heads"], expected["head_dim"])
    assert config.get_text_config().vocab_size == expected["vocab_size"]
    config.update({"head_dim": expected["head_dim"]})  # what vLLM does with --hf-overrides
    # vLLM may send hf_config to other processes: the class must unpickle by name in a fresh interpreter.
    blob = tmp_path / "config.pkl"
    blob.write_bytes(pickle.dumps(config))
    code = ("import pickle, sys; c = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(type(c).__name__, c.num_key_value_heads, c.get_text_config().vocab_size)")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["Gemma4CompatConfig", str(expected["num_key_value_heads"]), str(expected["vocab_size"])]
    with pytest.raises(KeyError):
        vllm_plugin.gemma_config_class("llama")


# -------------------------------------------------------------------------------------------------------- register()


def test_register_without_nxdi_warns_once_and_returns(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "neuronx_distributed_inference", None)  # import -> ImportError
    with caplog.at_level(logging.WARNING, logger=vllm_plugin.__name__):
        assert vllm_plugin.register() is None
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "NxDI is not importable" in message and "neuronx-distributed-inference" in message
    assert "\n" not in message


def _fake_nxdi(monkeypatch) -> dict:
    model_types = {"gemma3": {"causal-lm": Other}, "llama": {"causal-lm": Other}}
    for name in ("neuronx_distributed_inference", "neuronx_distributed_inference.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    constants = types.ModuleType("neuronx_distributed_inference.utils.constants")
    constants.MODEL_TYPES = model_types
    monkeypatch.setitem(sys.modules, constants.__name__, constants)
    return model_types


def test_register_with_nxdi_wires_model_types_and_configs(monkeypatch):
    transformers = pytest.importorskip("transformers")
    model_types = _fake_nxdi(monkeypatch)
    modeling = types.ModuleType("nxdi_gemma.neuron.modeling")
    modeling.NeuronGemmaForCausalLM = Dummy
    monkeypatch.setitem(sys.modules, modeling.__name__, modeling)
    registered: list[str] = []
    monkeypatch.setattr(transformers.AutoConfig, "register", lambda t, cls, exist_ok=False: registered.append(t))
    tokenizers: list[type] = []
    monkeypatch.setattr(transformers.AutoTokenizer, "register", lambda cls, **kw: tokenizers.append(cls))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)  # no vLLM: its model registry is left alone
    vllm_plugin.register()
    assert model_types["gemma3"] == {"causal-lm": Dummy} and model_types["gemma4"] == {"causal-lm": Dummy}
    assert model_types["gemma4unified"] == {"causal-lm": Dummy}  # vllm-neuron's key for Gemma4UnifiedFor...
    assert model_types["llama"] == {"causal-lm": Other}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    expected = vllm_plugin.register_configs(lambda *a, **k: None, CONFIG_MAPPING)  # [] under transformers 5
    assert registered == [cls.model_type for cls in expected]
    assert tokenizers == expected


def test_register_with_nxdi_but_broken_modeling_fails_loudly(monkeypatch):
    _fake_nxdi(monkeypatch)
    monkeypatch.setitem(sys.modules, "nxdi_gemma.neuron.modeling", None)
    with pytest.raises(RuntimeError, match="does not import"):
        vllm_plugin.register()


def test_module_import_pulls_in_neither_nxdi_nor_vllm_nor_transformers():
    code = ("import sys, nxdi_gemma.neuron.vllm_plugin; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'neuronx_distributed_inference', 'neuronx_distributed', 'vllm', 'vllm_neuron', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_entry_point_resolves_to_register():
    plugins = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "nxdi_gemma"]
    assert len(plugins) == 1, "reinstall the package (pip install -e .) to refresh its entry points"
    assert plugins[0].value == "nxdi_gemma.neuron.vllm_plugin:register"
    assert plugins[0].load() is vllm_plugin.register


# ----------------------------------------------------------------------------------------------------------- scripts


def test_serve_script_syntax_and_arguments(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(SERVE)], check=True)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    vllm = fake_bin / "vllm"  # prints its arguments and the environment the script exported
    vllm.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\necho "$NEURON_COMPILED_ARTIFACTS"\n'
                    'echo "$VLLM_PLUGINS"\n')
    vllm.chmod(0o755)
    model = write_checkpoint(tmp_path / "gemma-3-4b", "gemma-3-4b")
    env = {key: value for key, value in os.environ.items()
           if key not in ("VLLM_PLUGINS", "NEURON_COMPILED_ARTIFACTS", "DISABLE_NEURON_CUSTOM_SCHEDULER")}
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", PYTHON=sys.executable, MODEL=str(model), TP="4")
    run = subprocess.run([bash, str(SERVE), "--seed", "0"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    args, artifacts, plugins = lines[:-2], lines[-2], lines[-1]
    assert args[:2] == ["serve", str(model)]

    def flag(name: str) -> str:
        return args[args.index(name) + 1]

    assert flag("--host") == "127.0.0.1" and flag("--tensor-parallel-size") == "4"
    assert flag("--max-model-len") == "4096" and flag("--max-num-seqs") == "4"
    assert json.loads(flag("--hf-overrides")) == {"num_key_value_heads": 4, "head_dim": 256}
    assert json.loads(flag("--additional-config")) == {"override_neuron_config": {}}
    assert "--no-enable-prefix-caching" not in args and args[-2:] == ["--seed", "0"]  # prefix caching on
    assert "--block-size" not in args and "--num-gpu-blocks-override" not in args  # the plugin supplies them
    assert artifacts.startswith(str(tmp_path / "neuron-compiled" / "gemma-3-4b-tp4-len4096-seqs4-"))
    assert plugins == "neuron,nxdi_gemma"

    env.update(VLLM_PLUGINS="other", OVERRIDE_NEURON_CONFIG='{"skip_warmup": true}')
    run = subprocess.run([bash, str(SERVE)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "other,neuron,nxdi_gemma"
    assert run.stdout.splitlines()[-2] != artifacts  # different settings, different artifacts directory
    env.update(BLOCK_SIZE="16", NUM_BLOCKS="1000")
    run = subprocess.run([bash, str(SERVE)], env=env, cwd=tmp_path, capture_output=True, text=True)
    args = run.stdout.splitlines()[:-2]
    assert run.returncode == 0 and flag("--block-size") == "16" and flag("--num-gpu-blocks-override") == "1000"
    del env["BLOCK_SIZE"], env["NUM_BLOCKS"]

    del env["MODEL"]
    run = subprocess.run([bash, str(SERVE)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and "set MODEL" in run.stderr


def _load_offline_script():
    spec = importlib.util.spec_from_file_location("offline_inference", OFFLINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_script_without_vllm_exits_with_a_clear_error(tmp_path, monkeypatch, capsys):
    offline = _load_offline_script()
    assert offline.vllm_plugins(None) == "neuron,nxdi_gemma"
    assert offline.vllm_plugins("nxdi_gemma,other") == "nxdi_gemma,other,neuron"
    model = write_checkpoint(tmp_path / "gemma-4-e2b", "gemma-4-e2b")
    monkeypatch.setitem(sys.modules, "vllm", None)
    for name in ("VLLM_PLUGINS", "NEURON_COMPILED_ARTIFACTS", "DISABLE_NEURON_CUSTOM_SCHEDULER"):
        monkeypatch.setenv(name, "")  # records the original value, restored after the test (main sets them)
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert offline.main(["--model", str(model), "--tp", "2"]) == 2
    assert "vLLM is not importable" in capsys.readouterr().err
    assert os.environ["VLLM_PLUGINS"] == "neuron,nxdi_gemma"
    assert "gemma-4-e2b-tp2-len4096-seqs4-" in os.environ["NEURON_COMPILED_ARTIFACTS"]
    assert offline.main(["--model", str(model), "--override-neuron-config", "[1]"]) == 2
    assert offline.main(["--model", str(tmp_path / "missing")]) == 2


def _serving(name: str = "gemma-3-4b", **changes):
    settings = dict(tp=2, batch=4, max_model_len=4096, dtype="bfloat16", prefix_caching=False, block_size=None,
                    instance="trn1.32xlarge")
    settings.update(changes)
    return vllm_plugin.check_serving_settings(public_config(name), f"{name}/config.json", **settings)


def test_serving_check_passes_fitting_settings_and_supplies_the_multimodal_fields():
    assert _serving() == vllm_plugin.hf_overrides_for(public_config("gemma-3-4b"))  # multimodal: the text fields
    assert _serving("gemma-3-1b", tp=1) == {}  # text-only: nothing to add
    assert _serving(batch=256, instance=None) == _serving()  # no instance: no HBM check


def test_serving_check_refuses_a_batch_that_does_not_fit_with_the_planner_figures():
    from nxdi_gemma.planning import GIB, largest_fit, memory_plan

    plan = plan_from_config(public_config("gemma-3-4b"))
    # vllm-neuron prefills one sequence per context-encoding call (ctx_batch_size 1): the plan the check makes
    need = memory_plan(plan, "trn1.32xlarge", 2, 256, 4096, prefill_batch=1)
    _, fitting = largest_fit(plan, "trn1.32xlarge", 2, seq_len=4096, prefill_batch=1)
    assert not need.fits and fitting >= 1
    with pytest.raises(vllm_plugin.ServeConfigError) as refused:
        _serving(batch=256)
    message = str(refused.value)
    assert message.startswith("error: batch 256 (--max-num-seqs) x --max-model-len 4096 at TP 2 needs ")
    assert f"{need.total_per_core / GIB:.1f} GiB per NeuronCore" in message
    assert f"pass --max-num-seqs {fitting} or less" in message and "\n" not in message
    with pytest.raises(vllm_plugin.ServeConfigError, match="batch 1 does not fit either"):
        _serving("gemma-3-27b", tp=1, instance="inf2.xlarge")


def test_serving_check_counts_quantized_weights():
    """override_neuron_config's quantization switches reach the HBM check (the planner's quantized figures): a
    serving shape that fits only with int8 weights is refused without them and passes with them."""
    from nxdi_gemma.planning import memory_plan

    override = {"quantized": True, "quantization_dtype": "int8", "kv_cache_quant": True}
    schemes = vllm_plugin.quantization_schemes(override)
    assert schemes == {"weights": "int8", "kv_cache": "fp8", "quantize_lm_head": False}
    assert vllm_plugin.quantization_schemes({"quantized": True, "quantization_dtype": "f8e4m3"})["weights"] == "fp8"
    plan = plan_from_config(public_config("gemma-3-12b"))
    # quantize_lm_head: the decode read drops by the head's bytes (2 -> 1 per parameter) minus its float32 scales
    head = vllm_plugin.quantization_schemes({**override, "quantize_lm_head": True})
    assert head["quantize_lm_head"]
    plain, quantized = memory_plan(plan, "inf2.xlarge", 2, 1, 4096, **schemes), memory_plan(
        plan, "inf2.xlarge", 2, 1, 4096, **head)
    saved = plan.vocab_size * plan.hidden_size - 4 * plan.vocab_size
    assert plain.weights_per_core - quantized.weights_per_core == saved // 2
    # Gemma 3 12B on inf2.xlarge (TP 2) at 32768 x batch 4: only with int8 weights
    assert not memory_plan(plan, "inf2.xlarge", 2, 4, 32768).fits
    assert memory_plan(plan, "inf2.xlarge", 2, 4, 32768, weights="int8").fits
    settings = dict(tp=2, batch=4, max_model_len=32768, instance="inf2.xlarge")
    with pytest.raises(vllm_plugin.ServeConfigError, match="batch 4"):
        _serving("gemma-3-12b", **settings)
    assert _serving("gemma-3-12b", **settings, weights="int8") == _serving("gemma-3-12b", **dict(settings,
                                                                                                 instance=None))


@pytest.mark.parametrize(("changes", "flag"), [
    ({"prefix_caching": True}, "--block-size"),
    ({"max_model_len": 10**7}, "--max-model-len 131072 or less"),
    ({"tp": 3}, "--tensor-parallel-size 3 does not divide"),
    ({"tp": 8, "instance": "trn2.3xlarge"}, "exceeds the 4 NeuronCores of trn2.3xlarge"),
    ({"dtype": "float8"}, "--dtype float8"),
])
def test_serving_check_refusals_name_the_flag(changes, flag):
    with pytest.raises(vllm_plugin.ServeConfigError) as refused:
        _serving(**changes)
    assert str(refused.value).startswith("error: ") and flag in str(refused.value)


def test_serve_config_error_is_a_one_line_exit_and_a_config_error():
    from nxdi_gemma.errors import ConfigError

    error = vllm_plugin.ServeConfigError("what to pass")
    assert isinstance(error, SystemExit) and isinstance(error, ConfigError)
    assert error.code == "error: what to pass"  # what the interpreter prints (exit status 1) instead of a traceback
    assert _serving(prefix_caching=True, block_size=32) == _serving()


def test_prefix_caching_defaults_are_supplied_and_planned():
    """Prefix caching on (vLLM's default) without --block-size / --num-gpu-blocks-override: the plugin supplies the
    block size and the block count vllm-neuron gives NxDI; what the user or override_neuron_config set is kept."""
    from nxdi_gemma.planning import GIB, block_kv_cache_bytes, memory_plan

    def cache(**fields):
        return types.SimpleNamespace(**{"enable_prefix_caching": True, "block_size": None,
                                        "num_gpu_blocks_override": None, **fields})

    given = cache()
    assert vllm_plugin.supply_prefix_caching_defaults(given, {}, 4100, 4) == {
        "block_size": 32, "num_gpu_blocks_override": 129 * 4}
    assert (given.block_size, given.num_gpu_blocks_override) == (32, 516)
    given = cache(block_size=16, num_gpu_blocks_override=1000)
    assert vllm_plugin.supply_prefix_caching_defaults(given, {}, 4096, 4) == {}
    assert (given.block_size, given.num_gpu_blocks_override) == (16, 1000)
    given = cache()
    assert vllm_plugin.supply_prefix_caching_defaults(given, {"pa_block_size": 64, "pa_num_blocks": 300}, 4096, 4) \
        == {"block_size": 64, "num_gpu_blocks_override": 300}
    off = cache(enable_prefix_caching=False)
    assert vllm_plugin.supply_prefix_caching_defaults(off, {}, 4096, 4) == {} and off.block_size is None

    # the HBM check plans the block layout's KV (every producer layer stores every position)
    plan = plan_from_config(public_config("gemma-3-4b"))
    blocked = memory_plan(plan, "trn1.32xlarge", 2, 64, 4096, block_size=32, prefill_batch=1)
    assert blocked.kv_cache_per_core == block_kv_cache_bytes(plan, 2, 64, 4096, 2, 32)
    assert blocked.kv_cache_per_core > memory_plan(plan, "trn1.32xlarge", 2, 64, 4096).kv_cache_per_core
    with pytest.raises(vllm_plugin.ServeConfigError) as refused:
        _serving(batch=64, prefix_caching=True, block_size=32, num_blocks=128 * 64)
    assert f"{blocked.total_per_core / GIB:.1f} GiB per NeuronCore" in str(refused.value)
    assert "block KV layout: 8192 blocks of 32" in str(refused.value)


@pytest.mark.parametrize(("override", "settings", "wanted"), [
    ({"flash_decoding_enabled": True}, {}, "override_neuron_config sets flash_decoding_enabled"),
    ({"attn_kernel_enabled": True}, {}, "attn_kernel_enabled"),
    ({}, {"speculative": "ngram"}, "method 'ngram'"),
    ({}, {"chunked_prefill": True}, "DISABLE_NEURON_CUSTOM_SCHEDULER"),
])
def test_unsupported_features_are_refused_before_the_start(override, settings, wanted):
    # neuron/config.py's UNSUPPORTED_FLAGS needs NxDI (the sim tier's test_refused_before_compile uses the real one)
    unsupported = ("flash_decoding_enabled", "is_chunked_prefill")
    vllm_plugin.check_supported_features({"on_cpu": True, "flash_decoding_enabled": False}, unsupported, speculative=None,
                                         chunked_prefill=False)
    vllm_plugin.check_supported_features({}, (), speculative="draft_model", chunked_prefill=True)  # supported: accepted
    with pytest.raises(vllm_plugin.ServeConfigError, match="leave out --speculative-config"):
        vllm_plugin.check_supported_features({}, ("enable_fused_speculation",), speculative="draft_model",
                                             chunked_prefill=False)
    with pytest.raises(vllm_plugin.ServeConfigError) as refused:
        vllm_plugin.check_supported_features(override, unsupported,
                                             **{"speculative": None, "chunked_prefill": False, **settings})
    assert str(refused.value).startswith("error: ") and wanted in str(refused.value)


def test_register_serving_check_keeps_an_existing_entry_and_is_idempotent(monkeypatch):
    calls = []

    class Existing:
        @staticmethod
        def verify_and_update_config(vllm_config):
            calls.append("existing")

        @staticmethod
        def verify_and_update_model_config(model_config):  # vLLM 0.16's ModelConfig hook
            calls.append("existing model")

    monkeypatch.setattr(vllm_plugin.GemmaServingConfig, "previous", {})
    monkeypatch.setattr(vllm_plugin, "serving_check", lambda vllm_config: calls.append("ours"))
    config_map = {"Gemma3ForCausalLM": Existing, "LlamaForCausalLM": Existing}
    assert vllm_plugin.register_serving_check(config_map) == list(vllm_plugin.GEMMA_ARCHITECTURES)
    vllm_plugin.register_serving_check(config_map)
    assert all(config_map[arch] is vllm_plugin.GemmaServingConfig for arch in vllm_plugin.GEMMA_ARCHITECTURES)
    assert config_map["LlamaForCausalLM"] is Existing
    for arch in ("Gemma3ForCausalLM", "Gemma2ForCausalLM"):
        vllm_config = types.SimpleNamespace(model_config=types.SimpleNamespace(architecture=arch))
        config_map[arch].verify_and_update_config(vllm_config)
    assert calls == ["existing", "ours", "ours"]
    for arch in ("Gemma3ForCausalLM", "Gemma2ForCausalLM"):  # ours has nothing to do there; the previous entry runs
        config_map[arch].verify_and_update_model_config(types.SimpleNamespace(architecture=arch))
    assert calls == ["existing", "ours", "ours", "existing model"]


def test_current_instance_rules():
    from nxdi_gemma.errors import InputError
    from nxdi_gemma.planning import current_instance

    assert current_instance({"NXDI_GEMMA_INSTANCE": "trn2.3xlarge"}, "trn1.32xlarge\n") == "trn2.3xlarge"
    assert current_instance({"NXDI_GEMMA_INSTANCE": "none"}, "trn1.32xlarge\n") is None
    assert current_instance({}, "trn1.32xlarge\n") == "trn1.32xlarge"  # EC2's DMI product name
    for environ, dmi in (({}, None), ({}, "Standard PC (Q35 + ICH9, 2009)\n"), ({"NXDI_GEMMA_INSTANCE": "p5"}, None)):
        with pytest.raises(InputError, match="NXDI_GEMMA_INSTANCE"):
            current_instance(environ, dmi)


def _adapter(folder: Path, rank: int = 4, targets=("q_proj", "down_proj")) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": list(targets)}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(("change", "message"), [
    (None, None),
    ("missing", "no adapter_config.json and *.safetensors"),
    ("rank", "rank 16, above --max-lora-rank 8"),
    ("target", "targets ['lm_head']"),
])
def test_bad_lora_adapters_are_dropped_naming_the_reason(tmp_path, caplog, change, message):
    """Each adapter of lora_ckpt_json NxDI cannot serve is dropped with one error line naming it and why; NxDI is
    handed a copy listing the others (and the reasons, for GemmaLoraModelManager); the user's file is untouched."""
    _adapter(tmp_path / "a4")
    paths = {"a4": "a4", "b": "b"}
    if change == "rank":
        _adapter(tmp_path / "b", rank=16)
    elif change == "target":
        _adapter(tmp_path / "b", targets=("q_proj", "lm_head"))
    elif change is None:
        _adapter(tmp_path / "b", rank=8, targets=("v_proj", "gate_proj"))
    ckpt_json = tmp_path / "lora.json"
    original = json.dumps({"lora-ckpt-dir": str(tmp_path), "lora-ckpt-paths": paths, "lora-ckpt-paths-cpu": paths})
    ckpt_json.write_text(original)
    override = {"lora_ckpt_json": str(ckpt_json)}
    with caplog.at_level(logging.ERROR, logger=vllm_plugin.__name__):
        kept = vllm_plugin.serve_lora_adapters(override, 8, plan_has_moe=False)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    if message is None:
        assert kept == ["a4", "b"] and errors == [] and override["lora_ckpt_json"] == str(ckpt_json)
        with pytest.raises(vllm_plugin.ServeConfigError) as refused:  # MLP targets on MoE: neither can be served
            vllm_plugin.select_lora_adapters(str(ckpt_json), 8, plan_has_moe=True)
        assert "'a4': targets ['down_proj']: on a Gemma 4 MoE model" in str(refused.value)
        assert "'b': targets ['gate_proj']: on a Gemma 4 MoE model" in str(refused.value)
        with pytest.raises(vllm_plugin.ServeConfigError, match="lora_ckpt_json"):
            vllm_plugin.select_lora_adapters(None, 8, plan_has_moe=False)
        with pytest.raises(vllm_plugin.ServeConfigError, match="no LoRA adapter can be served .*'a4': rank 4"):
            vllm_plugin.select_lora_adapters(str(ckpt_json), 2, plan_has_moe=False)
        return
    assert kept == ["a4"] and ckpt_json.read_text() == original
    (line,) = errors
    assert line.startswith("error: LoRA adapter 'b' ") and message in line and "serving the others (a4)" in line
    handed = json.loads(Path(override["lora_ckpt_json"]).read_text())
    assert handed["lora-ckpt-paths"] == handed["lora-ckpt-paths-cpu"] == {"a4": "a4"}
    assert message in handed[vllm_plugin.DROPPED_KEY]["b"] and handed["lora-ckpt-dir"] == str(tmp_path)
    # the same adapters give the same file (vllm-neuron's artifact hash of override_neuron_config stays stable)
    assert vllm_plugin.serve_lora_adapters({"lora_ckpt_json": str(ckpt_json)}, 8, False) == kept
