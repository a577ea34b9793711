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
    assert "compressed-tensors checkpoint (no weight quantization in config_groups" in capsys.readouterr().err


@pytest.mark.parametrize("lm_head", [False, True], ids=["bf16-head", "quantized-head"])
@pytest.mark.parametrize("kind", ["gemma3", "gemma4"])
def test_planner_counts_the_quantized_checkpoint(kind, lm_head, tmp_path):
    """The planner's quantized parameters and scales equal what `nxdi-gemma quantize` writes (int8, per channel),
    with the LM head quantized (--lm-head) or not."""
    from nxdi_gemma.planning import parameter_counts

    model = write_tiny_checkpoint(tmp_path / kind, kind)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model), "--out", str(out), *(["--lm-head"] if lm_head else [])]) == 0
    quantized = scales = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            if t.dtype == torch.int8:
                quantized += t.numel()
            elif name.endswith(("scale", "_scale")) and "router" not in name:
                scales += t.numel()
    counts = parameter_counts(load_plan(model))
    head, head_scales = (counts["head"], counts["head_scales"]) if lm_head else (0, 0)
    assert (counts["quantized"] + head, counts["scales"] + head_scales) == (quantized, scales)


def test_quantized_lm_head_is_opt_in(tmp_path):
    """`quantize --lm-head`: the tied head's own int8 copy ([vocab, hidden]) with one scale per vocab row, equal to
    the independent reference's rounding; the embedding table stays as stored. Loading refuses a checkpoint
    quantized the other way in one line, in both directions; the switch alone (no quantized weights) is refused."""
    from nxdi_gemma.quantize import check_neuron_config

    model = write_tiny_checkpoint(tmp_path / "g2", "gemma2")
    plan = load_plan(model)
    assert plan.tie_word_embeddings
    with_head, plain = tmp_path / "with_head", tmp_path / "plain"
    assert main(["quantize", "--model", str(model), "--out", str(with_head), "--lm-head"]) == 0
    head_scheme = Scheme("int8", "per_channel", lm_head=True)
    check_quantized_checkpoint(with_head, model, plan, head_scheme)
    state = load_state_dict(model, plan, expected_shapes(plan), dtype=None)
    ref = int8_rounded_reference(state, plan, lm_head=True)
    with safe_open(str(with_head / "model.safetensors"), "pt") as f:
        q, s = f.get_tensor("lm_head.weight"), f.get_tensor("lm_head.scale")
        assert q.dtype == torch.int8 and q.shape == (plan.vocab_size, plan.hidden_size) and s.shape == (q.shape[0], 1)
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), state["model.embed_tokens.weight"])
    assert torch.allclose(q.float() * s, ref["lm_head.weight"], rtol=0, atol=1e-7)
    assert not torch.equal(ref["lm_head.weight"], state["model.embed_tokens.weight"].float())  # it was rounded
    ensure_quantized(model, plain, Scheme("int8", "per_channel"))  # first use, without the head
    for qdir, scheme, message in ((with_head, Scheme("int8", "per_channel"), "quantized with the LM head, but the "
                                   "neuron config has quantize_lm_head=false; set quantize_lm_head=true"),
                                  (plain, head_scheme, "quantized without the LM head, but the neuron config has "
                                   "quantize_lm_head=true; set quantize_lm_head=false")):
        with pytest.raises(CheckpointError, match=message) as err:
            check_quantized_checkpoint(qdir, model, plan, scheme)
        assert "\n" not in str(err.value)
    # fp8 per tensor: the head's scale is one value
    fp8 = tmp_path / "fp8"
    ensure_quantized(model, fp8, Scheme("fp8", "per_tensor", lm_head=True))
    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.float8_e4m3fn and f.get_tensor("lm_head.scale").shape == (1,)
    with pytest.raises(ConfigError, match="quantize_lm_head=true without quantized=true"):
        check_neuron_config({}, quantize_lm_head=True)


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
        ({"kv_cache_quant": True, "is_block_kv_layout": True, "is_prefix_caching": True}, "block KV layout"),
        ({"quantized": True, "quantized_checkpoints_path": "/q", "lora_config": {"max_loras": 1}}, "LoRA"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            check_neuron_config(dict(fields))


def fp8_hub_checkpoint(src, out, fmt: str, per_tensor: bool = False):
    """A pre-quantized FP8 checkpoint as the Hub's tools write them (llm-compressor's compressed-tensors, NVIDIA
    ModelOpt): every attention/MLP linear as float8_e4m3fn q = w / s with s = amax / 448 (per output channel, or per
    tensor) in `*.weight_scale`, plus activation scales (`input_scale`, ModelOpt); everything else as stored."""
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    if fmt == "compressed-tensors":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": {
                "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}, "weights": {
                "num_bits": 8, "type": "float", "strategy": "tensor" if per_tensor else "channel", "symmetric": True,
                "dynamic": False}}}}
    else:
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None}
        (out / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    (out / "config.json").write_text(json.dumps(config))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for name in [n for n in tensors if n.endswith(("_proj.weight",)) and ".layers." in n]:
        w = tensors[name].float()
        amax = w.abs().amax() if per_tensor else w.abs().amax(dim=1, keepdim=True)
        scale = amax / 448.0
        tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        tensors[name + "_scale"] = scale.reshape(()) if per_tensor else scale
        if fmt == "modelopt":
            tensors[name[: -len("weight")] + "input_scale"] = torch.tensor(0.01)
    save_file(tensors, str(out / "model.safetensors"))
    return out, tensors


@pytest.mark.parametrize(("fmt", "per_tensor"), [("compressed-tensors", False), ("compressed-tensors", True),
                                                 ("modelopt", True)])
def test_fp8_hub_checkpoint_converted_to_the_same_values(fmt, per_tensor, tmp_path, capsys):
    """FP8 compressed-tensors / ModelOpt checkpoints become our fp8 per-channel checkpoint (what NxD's layers load)
    whose dequantized weights q' * s' equal the source's q * s: exactly wherever q / 2 is a normal e4m3 value
    (Neuron's e4m3 stops at 240, so channels reaching 448 are halved), within 2^-9 s below that."""
    src = write_tiny_checkpoint(tmp_path / "g3", "gemma3")
    hub, source = fp8_hub_checkpoint(src, tmp_path / "hub", fmt, per_tensor)
    # without quantized weights it cannot run: one line saying how to run it
    assert main(["token-match", "--model", str(hub), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pre-quantized FP8" in err and "quantization_dtype=f8e4m3" in err, err
    # int8 (or per tensor) would round the FP8 weights again: refused
    assert main(["quantize", "--model", str(hub), "--out", str(tmp_path / "q8")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fp8 per channel only" in err, err
    assert not (tmp_path / "q8").exists()
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(hub), "--out", str(out), "--dtype", "fp8"]) == 0
    plan = load_plan(src)
    scheme = Scheme("fp8", "per_channel")
    check_quantized_checkpoint(out, hub, plan, scheme)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        converted = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    quantized = [n for n in converted if n.endswith("_proj.weight")]
    assert len(quantized) == 7 * plan.num_layers
    halved = 0
    for name in quantized:
        q, s = source[name].float(), source[name + "_scale"].float().reshape(-1, 1)
        q2, s2 = converted[name].float(), converted[name[: -len("weight")] + "scale"]
        assert converted[name].dtype == torch.float8_e4m3fn and s2.shape == (q.shape[0], 1)
        assert q2.abs().max() <= 240
        normal = (q.abs() >= 2**-5) | (s2 == s)
        assert torch.equal((q2 * s2)[normal], (q * s).expand_as(q)[normal]), name
        assert ((q2.double() * s2.double() - q.double() * s.double()).abs() <= 2**-9 * s.double()).all(), name
        halved += int((s2 != s).any())
    assert halved > 0  # the 448 -> 240 range change was exercised
    if fmt == "compressed-tensors" and not per_tensor:
        # --lm-head: the Hub checkpoint's unquantized (tied) head quantized by our scheme; the embedding as stored
        head = tmp_path / "q_head"
        assert main(["quantize", "--model", str(hub), "--out", str(head), "--dtype", "fp8", "--lm-head"]) == 0
        check_quantized_checkpoint(head, hub, plan, Scheme("fp8", "per_channel", lm_head=True))
        with safe_open(str(head / "model.safetensors"), "pt") as f:
            q, s = f.get_tensor("lm_head.weight"), f.get_tensor("lm_head.scale")
            assert torch.equal(f.get_tensor("model.embed_tokens.weight"), source["model.embed_tokens.weight"])
        assert q.dtype == torch.float8_e4m3fn and s.shape == (plan.vocab_size, 1)
        assert torch.equal(q.float(), quantize_tensor(source["model.embed_tokens.weight"],
                                                      Scheme("fp8", "per_channel"))[0].float())
    for name, tensor in converted.items():  # the rest is the source's, unchanged
        if not name.endswith(("_proj.weight", "_proj.scale")):
            assert torch.equal(tensor, source[name]), name


def test_bad_fp8_hub_checkpoints_are_one_line(tmp_path, capsys):
    src = write_tiny_checkpoint(tmp_path / "g3", "gemma3")
    hub, tensors = fp8_hub_checkpoint(src, tmp_path / "hub", "compressed-tensors")
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    cases = {
        "wrong scale shape": ({name: torch.ones(3, 1)}, "expected a float scale per output channel"),
        "missing scale": ({name: None}, "has no weight_scale"),
        "foreign tensor": ({"model.layers.0.self_attn.q_proj.weight_packed": torch.ones(2)}, "unexpected tensor"),
    }
    for what, (change, message) in cases.items():
        bad = tmp_path / what.replace(" ", "_")
        bad.mkdir()
        (bad / "config.json").write_text((hub / "config.json").read_text())
        edited = {k: v for k, v in {**tensors, **change}.items() if v is not None}
        save_file(edited, str(bad / "model.safetensors"))
        assert main(["quantize", "--model", str(bad), "--out", str(tmp_path / "o"), "--dtype", "fp8"]) == 2, what
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (what, err)
        assert not (tmp_path / "o").exists()
    # formats that are not converted, named
    config = json.loads((hub / "config.json").read_text())
    for quant, message in [
        ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights": {
            "num_bits": 4, "type": "int", "strategy": "group"}}}}, "4-bit int weights, strategy group"),
        ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "ModelOpt NVFP4"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "quantization_config (fp8)"),
        ({"quant_method": "gptq", "bits": 4}, "quantization_config (gptq)"),
    ]:
        (hub / "config.json").write_text(json.dumps(dict(config, quantization_config=quant)))
        assert main(["quantize", "--model", str(hub), "--out", str(tmp_path / "o"), "--dtype", "fp8"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_compile_refuses_fp8_hub_checkpoint_with_another_scheme(tmp_path, capsys):
    """`nxdi-gemma compile` checks a pre-quantized FP8 checkpoint against the compile config before NxDI is imported:
    without quantized weights, or with int8, one line."""
    src = write_tiny_checkpoint(tmp_path / "g3", "gemma3")
    hub, _ = fp8_hub_checkpoint(src, tmp_path / "hub", "compressed-tensors")
    for fields, message in [({}, "runs only as fp8 weights"),
                            ({"quantized": True, "quantization_dtype": "int8"}, "converted to fp8 per channel only")]:
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"neuron_config": {"tp_degree": 1, **fields}}))
        assert main(["compile", "--model", str(hub), "--config", str(config), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "o").exists()
