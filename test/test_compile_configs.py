"""compile_configs/*.json: every shipped NxDI compile configuration is valid for its model and instance, fits the
instance's HBM per core by our memory plan, and is exactly what scripts/make_compile_configs.py generates.

CPU only: no NxDI import (UNSUPPORTED_FLAGS is read from the source of nxdi_gemma.neuron.config, which imports NxDI).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from nxdi_gemma.planning import INSTANCES, check_tp, memory_plan, prefill_chunk
from nxdi_gemma.public_models import PUBLIC_CONFIGS, public_plan

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "compile_configs"
SCRIPT = ROOT / "scripts" / "make_compile_configs.py"
FILES = sorted(CONFIG_DIR.glob("*.json"))

# Models that must have at least one configuration (issue 3: Gemma 2/3; issue 4: Gemma 4).
REQUIRED_MODELS = (
    "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b",
    "gemma-4-e2b", "gemma-4-e4b", "gemma-4-31b", "gemma-4-26b-a4b", "gemma-4-12b",
)
# NxDI NeuronConfig fields (models/config.py, NeuronConfig.__init__) that our configurations may set.
KNOWN_FIELDS = {
    "tp_degree", "batch_size", "seq_len", "max_context_length", "max_length", "n_positions", "torch_dtype",
    "enable_bucketing", "buckets", "context_encoding_buckets", "token_generation_buckets", "fused_qkv",
    "attn_kernel_enabled", "on_device_sampling_config", "logical_nc_config", "padding_side", "output_logits",
    "attention_dtype", "rpl_reduce_dtype", "cast_type", "vocab_parallel", "prefill_chunk_size", "quantized",
    "quantization_dtype", "quantization_type",
}
QUANTIZED = {"quantized": True, "quantization_dtype": "int8", "quantization_type": "per_channel_symmetric"}
SAMPLING_FIELDS = {"do_sample", "top_k", "top_p", "temperature", "dynamic", "deterministic", "global_topk"}
SCHEMA_KEYS = [
    "tp_degree", "batch_size", "seq_len", "max_context_length", "prefill_chunk_size", "torch_dtype", "enable_bucketing",
    "context_encoding_buckets", "token_generation_buckets", "fused_qkv", "attn_kernel_enabled",
    "on_device_sampling_config",
]


def unsupported_flags() -> tuple[str, ...]:
    """UNSUPPORTED_FLAGS of nxdi_gemma.neuron.config, read from its source without importing NxDI."""
    package = importlib.util.find_spec("nxdi_gemma").submodule_search_locations[0]
    tree = ast.parse((Path(package) / "neuron" / "config.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "UNSUPPORTED_FLAGS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("UNSUPPORTED_FLAGS not found in nxdi_gemma/neuron/config.py")


def load_script():
    spec = importlib.util.spec_from_file_location("make_compile_configs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_configs():
    assert FILES, f"no JSON in {CONFIG_DIR}; run scripts/make_compile_configs.py"


def test_every_required_model_has_a_config():
    models = {load(path)["model"] for path in FILES}
    missing = [m for m in REQUIRED_MODELS if m not in models]
    assert not missing, f"no compile config for {missing}"


@pytest.fixture(params=FILES, ids=[p.stem for p in FILES])
def entry(request) -> tuple[Path, dict]:
    return request.param, load(request.param)


def test_schema_and_names(entry):
    path, config = entry
    assert list(config) == ["model", "instance", "notes", "neuron_config"]
    assert config["model"] in PUBLIC_CONFIGS
    assert config["instance"] in INSTANCES
    nc = config["neuron_config"]
    quantized = nc.get("quantized", False)
    assert path.name == f"{config['model']}__{config['instance']}{'__int8' if quantized else ''}.json"
    assert isinstance(config["notes"], str) and config["notes"].strip()
    trn2 = config["instance"].startswith("trn2")
    assert list(nc) == SCHEMA_KEYS + (["logical_nc_config"] if trn2 else []) + (list(QUANTIZED) if quantized else [])
    if quantized:
        assert {k: nc[k] for k in QUANTIZED} == QUANTIZED
    if trn2:
        assert nc["logical_nc_config"] == 2
    assert nc["torch_dtype"] == "bfloat16"
    assert nc["enable_bucketing"] is True
    assert nc["fused_qkv"] is True
    for key in ("tp_degree", "batch_size", "seq_len", "max_context_length"):
        assert isinstance(nc[key], int) and not isinstance(nc[key], bool) and nc[key] >= 1, key


def test_only_known_and_supported_fields(entry):
    _, config = entry
    nc = config["neuron_config"]
    assert set(nc) <= KNOWN_FIELDS, f"unknown NeuronConfig fields {sorted(set(nc) - KNOWN_FIELDS)}"
    refused = set(unsupported_flags())
    assert refused, "UNSUPPORTED_FLAGS is empty"
    assert not set(nc) & refused, f"fields GemmaNeuronConfig refuses: {sorted(set(nc) & refused)}"
    assert nc.get("padding_side", "right") == "right"
    sampling = nc["on_device_sampling_config"]
    assert set(sampling) <= SAMPLING_FIELDS
    assert sampling == {"do_sample": False, "top_k": 1}  # greedy, so the token match is deterministic


def test_attention_kernels_off(entry):
    # Our attention core is plain torch; NxDI's default None still turns the flash kernel on for long prompts, so the
    # flag must be an explicit false. Head dims above 128 (every Gemma but 2-27B / 3-27B; Gemma 4 global layers
    # have 512) are outside what the kernels implement in any case.
    _, config = entry
    assert config["neuron_config"]["attn_kernel_enabled"] is False


def test_tensor_parallel_degree(entry):
    _, config = entry
    tp = config["neuron_config"]["tp_degree"]
    plan = public_plan(config["model"])
    assert tp <= INSTANCES[config["instance"]].cores
    check_tp(plan, tp)  # raises unless the query heads split and every KV head count divides or is divided by TP
    assert plan.num_heads % tp == 0
    for layer in plan.layers:
        assert layer.num_kv_heads % tp == 0 or tp % layer.num_kv_heads == 0
        # GemmaInferenceConfig.add_derived_config refuses an MLP width TP does not divide.
        assert layer.intermediate_size % tp == 0
    assert plan.hidden_size % tp == 0


def test_lengths_and_buckets(entry):
    _, config = entry
    nc = config["neuron_config"]
    plan = public_plan(config["model"])
    context, seq_len = nc["max_context_length"], nc["seq_len"]
    assert context <= seq_len <= plan.max_position_embeddings
    # Prompts run in chunks through the context-encoding graph: its buckets stop at the chunk, which is the
    # planner's choice for this TP, batch and length (what GemmaInferenceConfig would pick by itself).
    chunk = nc["prefill_chunk_size"]
    assert chunk == prefill_chunk(plan, nc["tp_degree"], nc["batch_size"], seq_len, context)
    assert 2 <= chunk <= context
    for key, limit in (("context_encoding_buckets", chunk), ("token_generation_buckets", seq_len)):
        buckets = nc[key]
        assert buckets, key
        assert buckets == sorted(set(buckets)), f"{key} not strictly increasing: {buckets}"
        assert all(isinstance(b, int) and 1 <= b <= limit for b in buckets), key
        assert buckets[-1] == limit, f"{key} must end at {limit}: {buckets}"
    assert all(b & (b - 1) == 0 for b in nc["context_encoding_buckets"]), "context buckets must be powers of two"


def test_fits_instance_hbm(entry):
    _, config = entry
    nc = config["neuron_config"]
    result = memory_plan(public_plan(config["model"]), config["instance"], nc["tp_degree"], nc["batch_size"],
                         nc["seq_len"], nc["torch_dtype"], weights=nc.get("quantization_dtype", "model"))
    assert result.fits, (
        f"{config['model']} on {config['instance']}: {result.total_per_core / 2**30:.2f} GiB per core "
        f"> {result.hbm_per_core / 2**30:.0f} GiB"
    )
    assert result.weights_per_core + result.kv_cache_per_core + result.activations_per_core <= result.hbm_per_core


def test_generator_reproduces_the_files(tmp_path):
    script = load_script()
    assert script.main(["--out", str(tmp_path), "--quiet"]) == 0
    generated = sorted(p.name for p in tmp_path.glob("*.json"))
    assert generated == [p.name for p in FILES], "compile_configs/ is stale: run scripts/make_compile_configs.py"
    for path in FILES:
        assert (tmp_path / path.name).read_text() == path.read_text(), f"{path.name} differs from the generator's"


def test_generator_is_deterministic_and_removes_stale(tmp_path):
    script = load_script()
    stale = tmp_path / "gemma-9-9b__nowhere.json"
    stale.write_text("{}")
    script.main(["--out", str(tmp_path), "--quiet"])
    first = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    assert stale.name not in first
    script.main(["--out", str(tmp_path), "--quiet"])
    assert first == {p.name: p.read_text() for p in tmp_path.glob("*.json")}


def test_fold_norm_offset_belongs_in_neuron_config(tmp_path):
    # Read at top level by earlier versions; now a neuron-config field (what vllm-neuron's override_neuron_config
    # reaches): a compile config that still has it at top level is refused with one line saying where it goes.
    from nxdi_gemma.errors import ConfigError
    from nxdi_gemma.neuron.runtime import read_compile_config

    config = json.loads((CONFIG_DIR / "gemma-3-1b__inf2.xlarge.json").read_text())
    inside = tmp_path / "inside.json"
    inside.write_text(json.dumps(dict(config, neuron_config=dict(config["neuron_config"], fold_norm_offset=True))))
    assert read_compile_config(inside)["neuron_config"]["fold_norm_offset"] is True
    top = tmp_path / "top.json"
    top.write_text(json.dumps(dict(config, fold_norm_offset=False)))
    with pytest.raises(ConfigError, match='move "fold_norm_offset" into "neuron_config"'):
        read_compile_config(top)


def test_int8_configs_only_where_they_change_the_fit():
    """An int8 file exists only where the bf16 weights do not fit, or fit a shorter context or smaller batch."""
    quantized = [load(p) for p in FILES if load(p)["neuron_config"].get("quantized")]
    assert quantized, "no int8 compile config"
    for config in quantized:
        plain = CONFIG_DIR / f"{config['model']}__{config['instance']}.json"
        nc = config["neuron_config"]
        if plain.exists():
            base = load(plain)["neuron_config"]
            assert (nc["seq_len"], nc["batch_size"]) > (base["seq_len"], base["batch_size"]), config["model"]
        else:  # the same shape with bf16 weights does not fit
            assert not memory_plan(public_plan(config["model"]), config["instance"], nc["tp_degree"], 1,
                                   nc["seq_len"], "bfloat16").fits, config["model"]
