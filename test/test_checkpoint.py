"""Checkpoint layouts on disk (single file, sharded, the multimodal text-decoder prefixes with their vision towers,
Gemma 4 KV-shared extras) and the errors for checkpoints that do not match their config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    FLOOR,
    GEMMA2_TINY,
    GEMMA3_TINY,
    GEMMA4_TINY_ALL,
    build_hf_model,
    hf_classes,
    hf_logits,
    make_prompt,
    max_diff,
    report,
    save_hf,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nxdi_gemma.checkpoint import check_checkpoint, expected_shapes, read_header, safetensors_files
from nxdi_gemma.cpu import KVCache, load_model
from nxdi_gemma.errors import CheckpointError, ConfigError
from nxdi_gemma.tiny import TINY_CONFIGS, write_tiny_checkpoint


@torch.no_grad()
def ours_prefill(model, prompt: list[int]) -> torch.Tensor:
    cache = KVCache.allocate(model.plan, 1, len(prompt), model.dtype)
    return model.forward_step(torch.tensor([prompt]), cache, torch.zeros(1, dtype=torch.long), last_only=False)[0]


def disk_names(path) -> set[str]:
    names = set()
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as h:
            names.update(h.keys())
    return names


def rewrite(path, change) -> None:
    """Apply `change(tensors)` to the single model.safetensors of a checkpoint directory."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """An HF-made Gemma 2 checkpoint (single file) and its HF model."""
    hf = build_hf_model("gemma2", GEMMA2_TINY, seed=11)
    return save_hf(hf, tmp_path_factory.mktemp("ckpt") / "gemma2"), hf


@pytest.fixture
def gemma2_copy(gemma2_dir, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(gemma2_dir[0], path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Layouts


def test_sharded_checkpoint_loads_identically(gemma2_dir, tmp_path):
    single, hf = gemma2_dir
    sharded = save_hf(hf, tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    prompt = make_prompt(24, GEMMA2_TINY["vocab_size"], seed=4)
    a = ours_prefill(load_model(single, progress=False), prompt)
    b = ours_prefill(load_model(sharded, progress=False), prompt)
    assert torch.equal(a, b)
    assert max_diff(b, hf_logits(hf, torch.tensor([prompt]))[0]) <= FLOOR
    report("checkpoint/sharded", f"{len(shards)} shards: identical logits to the single file")


def test_gemma3_multimodal_layout_on_disk(tmp_path):
    """HF 5 saves Gemma3ForConditionalGeneration in the legacy on-disk form `language_model.model.*` (like the real
    4B/12B/27B files), with `vision_tower.*` / `multi_modal_projector.*` next to it. We read the text decoder,
    skip the towers, and (like the wrapper) do not apply final_logit_softcapping."""
    text = dict(GEMMA3_TINY, final_logit_softcapping=1.0)  # the wrapper ignores it; so must we
    hf = build_hf_model("gemma3", text, seed=12)
    path = save_hf(hf, tmp_path / "gemma3mm")
    names = disk_names(path)
    assert "language_model.model.embed_tokens.weight" in names
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in names
    assert any(n.startswith("vision_tower.") for n in names)
    assert any(n.startswith("multi_modal_projector.") for n in names)
    assert not any(n.startswith("model.") for n in names)
    ours = load_model(path, progress=False)
    assert ours.plan.model_type == "gemma3" and ours.plan.final_logit_softcap is None
    prompt = make_prompt(24, text["vocab_size"], seed=4)
    diff = max_diff(ours_prefill(ours, prompt), hf_logits(hf, torch.tensor([prompt]))[0])
    report("checkpoint/gemma3 multimodal", f"prefill max|ours - HF Gemma3ForConditionalGeneration| = {diff:.2e}")
    assert diff <= FLOOR


def test_gemma4_multimodal_layout_on_disk(tmp_path):
    """Gemma4ForConditionalGeneration keeps `model.language_model.*` on disk, next to `model.vision_tower.*` and
    `model.embed_vision.*`; the wrapper applies the final softcap."""
    hf = build_hf_model("gemma4", GEMMA4_TINY_ALL, seed=13)
    path = save_hf(hf, tmp_path / "gemma4mm")
    names = disk_names(path)
    assert "model.language_model.embed_tokens_per_layer.weight" in names
    assert "model.language_model.layers.0.router.proj.weight" in names
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert any(n.startswith("model.embed_vision.") for n in names)
    ours = load_model(path, progress=False)
    assert ours.plan.final_logit_softcap == 1.0
    prompt = make_prompt(24, GEMMA4_TINY_ALL["vocab_size"], seed=4)
    diff = max_diff(ours_prefill(ours, prompt), hf_logits(hf, torch.tensor([prompt]))[0])
    report("checkpoint/gemma4 multimodal", f"prefill max|ours - HF Gemma4ForConditionalGeneration| = {diff:.2e}")
    assert diff <= FLOOR


def test_gemma4_kv_shared_layers_extra_kv_tensors_are_ignored(tmp_path):
    """KV-shared layers (4 and 5 here) have no k_proj/v_proj/k_norm; checkpoints that carry them anyway load,
    and the extra tensors have no effect (HF discards them too)."""
    hf = build_hf_model("gemma4_text", GEMMA4_TINY_ALL, seed=14)
    path = save_hf(hf, tmp_path / "gemma4")
    prompt = make_prompt(24, GEMMA4_TINY_ALL["vocab_size"], seed=4)
    before = ours_prefill(load_model(path, progress=False), prompt)
    gen = torch.Generator().manual_seed(0)

    def add_kv(tensors):
        for i, dim, kv in ((4, 16, 2), (5, 32, 1)):
            prefix = f"model.layers.{i}.self_attn."
            tensors[prefix + "k_proj.weight"] = torch.randn(kv * dim, 64, generator=gen)
            tensors[prefix + "v_proj.weight"] = torch.randn(kv * dim, 64, generator=gen)
            tensors[prefix + "k_norm.weight"] = torch.randn(dim, generator=gen)

    rewrite(path, add_kv)
    assert "model.layers.4.self_attn.k_proj.weight" in disk_names(path)
    after = ours_prefill(load_model(path, progress=False), prompt)
    assert torch.equal(before, after)
    _, model_cls = hf_classes("gemma4_text")
    hf_again = model_cls.from_pretrained(path, attn_implementation="eager")
    assert max_diff(after, hf_logits(hf_again, torch.tensor([prompt]))[0]) <= FLOOR


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_write_tiny_checkpoint_loads_in_hf_without_missing_or_unexpected_keys(tmp_path, kind):
    path = write_tiny_checkpoint(tmp_path / kind, kind)
    config = json.loads((path / "config.json").read_text())
    _, model_cls = hf_classes(config["model_type"])
    hf, info = model_cls.from_pretrained(path, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    prompt = make_prompt(24, config["vocab_size"], seed=4)
    diff = max_diff(
        ours_prefill(load_model(path, progress=False), prompt), hf_logits(hf.eval(), torch.tensor([prompt]))[0]
    )
    report(f"checkpoint/tiny {kind}", f"HF loads all keys; prefill max|ours - HF| = {diff:.2e}")
    assert diff <= FLOOR


# --------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the problem


def one_line_error(exc_type, path) -> str:
    with pytest.raises(exc_type) as err:
        load_model(path, progress=False)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_missing_tensor(gemma2_copy):
    rewrite(gemma2_copy, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    message = one_line_error(CheckpointError, gemma2_copy)
    assert "missing tensor model.layers.1.mlp.down_proj.weight" in message
    assert "[64, 128]" in message  # expected shape


def test_mis_shaped_tensor_names_tensor_expected_and_found_shapes(gemma2_copy):
    def cut(tensors):
        tensors["model.layers.2.self_attn.k_proj.weight"] = tensors["model.layers.2.self_attn.k_proj.weight"][:16]

    rewrite(gemma2_copy, cut)
    message = one_line_error(CheckpointError, gemma2_copy)
    assert "model.layers.2.self_attn.k_proj.weight" in message
    assert "[16, 64]" in message and "[32, 64]" in message  # found, expected


def test_unexpected_tensor(gemma2_copy):
    rewrite(gemma2_copy, lambda t: t.update({"model.layers.0.self_attn.bogus.weight": torch.zeros(3)}))
    message = one_line_error(CheckpointError, gemma2_copy)
    assert "unexpected tensor model.layers.0.self_attn.bogus.weight" in message


def test_tensor_beyond_the_configured_layers_is_unexpected(gemma2_copy):
    config = json.loads((gemma2_copy / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the file still has layer 3
    config["layer_types"] = config["layer_types"][:3]
    (gemma2_copy / "config.json").write_text(json.dumps(config))
    message = one_line_error(CheckpointError, gemma2_copy)
    assert "unexpected tensor model.layers.3." in message


def test_pickle_only_directory_is_refused_with_conversion_advice(gemma2_copy):
    (gemma2_copy / "model.safetensors").unlink()
    # never unpickled: not even a valid pickle
    (gemma2_copy / "pytorch_model.bin").write_bytes(b"not a pickle, must never be loaded")
    message = one_line_error(CheckpointError, gemma2_copy)
    assert "pytorch_model.bin" in message
    assert "save_pretrained" in message and "convert" in message


def test_empty_directory(tmp_path):
    message = one_line_error(ConfigError, tmp_path)
    assert "config.json" in message


def test_config_without_weights(gemma2_copy):
    (gemma2_copy / "model.safetensors").unlink()
    message = one_line_error(CheckpointError, gemma2_copy)
    assert "safetensors" in message


def test_index_listing_a_missing_shard(gemma2_dir, tmp_path):
    sharded = save_hf(gemma2_dir[1], tmp_path / "sharded", max_shard_size="200KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    message = one_line_error(CheckpointError, sharded)
    assert shard.name in message


# --------------------------------------------------------------------------------------------------------------
# Validation from config.json and the safetensors headers (what every command runs before HF or NxDI)


def test_expected_shapes_come_from_the_plan_and_equal_the_cpu_runtime():
    """`expected_shapes` is built from the plan and the shared layers, not from the CPU runtime; both must name and
    shape every tensor identically, on the tiny fixtures and on every public checkpoint's real geometry."""
    from nxdi_gemma.config import plan_from_config
    from nxdi_gemma.cpu import GemmaForCausalLM
    from nxdi_gemma.public_models import PUBLIC_CONFIGS, public_plan

    plans = [plan_from_config(c) for c in TINY_CONFIGS.values()]
    plans += [plan_from_config(dict(GEMMA4_TINY_ALL, model_type="gemma4_text"))]
    plans += [public_plan(name) for name in PUBLIC_CONFIGS]
    for plan in plans:
        with torch.device("meta"):
            runtime = {name: t.shape for name, t in GemmaForCausalLM(plan).state_dict().items()}
        assert expected_shapes(plan) == runtime, plan.model_type


def test_checkpoint_module_does_not_import_the_cpu_runtime(tmp_path):
    """No checkpoint <-> cpu import circle: validating a checkpoint never loads the CPU runtime."""
    path = write_tiny_checkpoint(tmp_path / "g4", "gemma4")
    code = (f"import sys; from nxdi_gemma.checkpoint import check_checkpoint; check_checkpoint({str(path)!r}); "
            "assert 'nxdi_gemma.cpu' not in sys.modules, 'the CPU runtime was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr


def test_check_checkpoint_reads_headers_only(tmp_path, monkeypatch):
    import nxdi_gemma.checkpoint as checkpoint

    path = write_tiny_checkpoint(tmp_path / "g4", "gemma4")

    def no_data(*args, **kwargs):
        raise AssertionError("check_checkpoint opened tensor data")

    monkeypatch.setattr(checkpoint, "safe_open", no_data)
    plan = check_checkpoint(path)
    assert plan.model_type == "gemma4_text" and plan.num_layers == TINY_CONFIGS["gemma4"]["num_hidden_layers"]


def raw_safetensors(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize(
    "header, data, needle",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 10, "truncated"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 20, "4 bytes after the last tensor"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12, "spans 12 bytes, expected 16"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12, "tensor b starts at byte 8"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed safetensors entry for tensor a"),
    ],
)
def test_safetensors_header_problems_are_one_line(tmp_path, header, data, needle):
    file = tmp_path / "model.safetensors"
    raw_safetensors(file, header, data)
    with pytest.raises(CheckpointError) as err:
        read_header(file)
    assert needle in str(err.value) and str(file) in str(err.value) and "\n" not in str(err.value)


def test_truncated_anywhere_is_refused_by_name(tmp_path):
    """An interrupted download cut inside the data, inside the header, or inside the length prefix."""
    path = write_tiny_checkpoint(tmp_path / "g3", "gemma3")
    file = path / "model.safetensors"
    whole = file.read_bytes()
    header_end = 8 + int.from_bytes(whole[:8], "little")
    for keep, needle in ((len(whole) - 1, "truncated"), (header_end - 5, "truncated"), (5, "too short")):
        file.write_bytes(whole[:keep])
        for call in (check_checkpoint, lambda p: load_model(p, progress=False)):
            with pytest.raises(CheckpointError) as err:
                call(path)
            assert needle in str(err.value) and str(file) in str(err.value), (keep, str(err.value))


def test_truncated_shard_of_a_sharded_checkpoint_is_named(gemma2_dir, tmp_path):
    sharded = save_hf(gemma2_dir[1], tmp_path / "sharded", max_shard_size="200KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated") as err:
        check_checkpoint(sharded)
    assert shard.name in str(err.value)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory") as err:
        check_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
