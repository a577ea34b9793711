"""The quantize step (safetensors -> safetensors) and its one-line refusals; the int8 reference's rounding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nxdi_gemma.checkpoint import expected_shapes, load_state_dict
from nxdi_gemma.cli import main
from nxdi_gemma.config import load_plan
from nxdi_gemma.errors import CheckpointError, ConfigError
from nxdi_gemma.quantize import (
    Scheme,
    check_quantized_checkpoint,
    ensure_quantized,
    int8_rounded_reference,
    quantize_tensor,
)
from nxdi_gemma.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("q") / "g4", "gemma4")


def test_int8_codes_equal_torch_quantizer():
    """Our rounding gives torch.quantize_per_channel's codes (what NxD's observers feed) on 4M values."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 1024, generator=gen) * torch.rand(4096, 1, generator=gen)
    q, scale = quantize_tensor(w, Scheme("int8", "per_channel"))
    ref = torch.quantize_per_channel(w, scale[:, 0].double(), torch.zeros(4096, dtype=torch.int64), 0, torch.qint8)
    assert q.dtype == torch.int8 and scale.shape == (4096, 1) and scale.dtype == torch.float32
    assert torch.equal(q, ref.int_repr())


def test_quantize_command_writes_what_nxd_layers_load(tiny4, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny4), "--out", str(out)]) == 0
    plan = load_plan(tiny4)
    scheme = Scheme("int8", "per_channel")
    check_quantized_checkpoint(out, tiny4, plan, scheme)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["nxdi_gemma.quantization"])["dtype"] == "int8"
        q, s = f.get_tensor("model.layers.0.self_attn.q_proj.weight"), f.get_tensor("model.layers.0.self_attn.q_proj.scale")
        assert q.dtype == torch.int8 and s.shape == (q.shape[0], 1)  # QuantizedColumnParallel's per-channel scale
        assert f.get_tensor("model.layers.0.experts.down_proj_scale").shape == (4, 64, 1)
        for kept in ("model.embed_tokens.weight", "model.layers.0.router.proj.weight",
                     "model.per_layer_model_projection.weight", "model.layers.0.per_layer_projection.weight"):
            assert f.get_tensor(kept).dtype == torch.float32
    # dequantized weights equal the independent reference's
    state = load_state_dict(tiny4, plan, expected_shapes(plan), dtype=None)
    ref = int8_rounded_reference(state, plan)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name in ("model.layers.2.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            deq = f.get_tensor(name).float() * f.get_tensor(name[: -len("weight")] + "scale")
            assert torch.allclose(deq, ref[name], rtol=0, atol=1e-7)
        deq = f.get_tensor("model.layers.0.experts.gate_up_proj").float() * f.get_tensor(
            "model.layers.0.experts.gate_up_proj_scale")
        assert torch.allclose(deq, ref["model.layers.0.experts.gate_up_proj"], rtol=0, atol=1e-7)
    # a second run refuses the existing directory
    assert main(["quantize", "--model", str(tiny4), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_bad_quantized_checkpoints_are_one_line(tiny4, tmp_path):
    plan = load_plan(tiny4)
    scheme = Scheme("int8", "per_channel")
    good = tmp_path / "good"
    ensure_quantized(tiny4, good, scheme)  # first use writes it
    with pytest.raises(CheckpointError, match="quantized as"):
        check_quantized_checkpoint(good, tiny4, plan, Scheme("fp8", "per_channel"))
    with pytest.raises(CheckpointError, match="no such"):
        check_quantized_checkpoint(tmp_path / "missing", tiny4, plan, scheme)
    # truncated
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    data = (good / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    (trunc / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointError, match="truncated"):
        check_quantized_checkpoint(trunc, tiny4, plan, scheme)
    # wrong scale shape / foreign (no metadata)
    with safe_open(str(good / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    bad = tmp_path / "badscale"
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    tensors["model.layers.0.self_attn.q_proj.scale"] = torch.ones(1)
    save_file(tensors, str(bad / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="shape"):
        check_quantized_checkpoint(bad, tiny4, plan, scheme)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text((good / "config.json").read_text())
    save_file(tensors, str(foreign / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        check_quantized_checkpoint(foreign, tiny4, plan, scheme)
    with pytest.raises(ConfigError, match="int4"):
        Scheme("int4", "per_channel")


def test_prequantized_hub_checkpoint_refused_by_format(tiny4, tmp_path, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    config = json.loads((tiny4 / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps(config))
    with safe_open(str(tiny4 / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(64, 1)
    save_file(tensors, str(hub / "model.safetensors"))
    for argv in (["quantize", "--model", str(hub), "--out", str(tmp_path / "o")],
                 ["token-match", "--model", str(hub), "--max-new-tokens", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "compressed-tensors / ModelOpt" in err, err
    assert not (tmp_path / "o").exists()
    # a config.json quantization_config (e.g. FP8 compressed-tensors) is refused by name too
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (hub / "config.json").write_text(json.dumps(config))
    del tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(tensors, str(hub / "model.safetensors"))
    assert main(["plan", "--model", str(hub), "--instance", "inf2.xlarge"]) == 0  # planning reads config only
    assert main(["quantize", "--model", str(hub), "--out", str(tmp_path / "o")]) == 2
    assert "quantization_config (compressed-tensors)" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["gemma3", "gemma4"])
def test_planner_counts_the_quantized_checkpoint(kind, tmp_path):
    """The planner's quantized parameters and scales equal what `nxdi-gemma quantize` writes (int8, per channel)."""
    from nxdi_gemma.planning import parameter_counts

    model = write_tiny_checkpoint(tmp_path / kind, kind)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model), "--out", str(out)]) == 0
    quantized = scales = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            if t.dtype == torch.int8:
                quantized += t.numel()
            elif name.endswith(("scale", "_scale")) and "router" not in name:
                scales += t.numel()
    counts = parameter_counts(load_plan(model))
    assert (counts["quantized"], counts["scales"]) == (quantized, scales)


def test_neuron_config_quantization_switches():
    """What `quantized` / `kv_cache_quant` neuron configs become, and the one-line refusals (NxDI would assert)."""
    from nxdi_gemma.quantize import check_neuron_config

    kwargs = {"quantized": True, "quantized_checkpoints_path": "/q"}
    check_neuron_config(kwargs)
    assert kwargs["quantization_type"] == "per_channel_symmetric"  # ours by default (NxDI's: per tensor)
    assert {"embed_tokens", "lm_head", "experts"} <= set(kwargs["modules_to_not_convert"])
    kv = {"kv_cache_quant": True}
    check_neuron_config(kv)
    assert kv["kv_quant_config"] == {"quant_dtype": torch.float8_e4m3fn, "direct_cast": True}
    # as neuron_config.json stores it (NxDI's to_dict of KVQuantizationConfig) when a compiled model reloads
    saved = {"kv_cache_quant": True, "kv_quant_config": {
        "direct_cast": True, "quant_dtype": "float8_e4m3fn",
        "k_quant_method": {"_value_": "per_tensor_symmetric", "_name_": "PER_TENSOR_SYMMETRIC"},
        "v_quant_method": {"_value_": "per_tensor_symmetric", "_name_": "PER_TENSOR_SYMMETRIC"}}}
    check_neuron_config(saved)
    assert saved["kv_quant_config"] == kv["kv_quant_config"]
    bad = [
        ({"quantized": True}, "needs quantized_checkpoints_path"),
        ({"quantized": True, "quantized_checkpoints_path": "/q", "quantization_dtype": "int4"}, "int4"),
        ({"quantized": True, "quantized_checkpoints_path": "/q", "quantization_type": "blockwise_symmetric"},
         "blockwise"),
        ({"quantized": True, "quantized_checkpoints_path": "/q", "quantization_type": "per_tensor_symmetric",
          "fused_qkv": True}, "fused_qkv"),
        ({"quantized": True, "quantized_checkpoints_path": "/q", "activation_quantization_type": "dynamic"},
         "activation"),
        ({"quantized_checkpoints_path": "/q"}, "without quantized"),
        ({"kv_cache_quant": True, "kv_quant_config": {"quant_dtype": "int8"}}, "int8"),
        ({"kv_cache_quant": True, "kv_quant_config": {"direct_cast": False}}, "direct-cast"),
        ({"kv_quant_config": {}}, "without kv_cache_quant"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            check_neuron_config(dict(fields))
