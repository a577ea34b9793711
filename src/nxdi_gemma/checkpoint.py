"""Hugging Face Gemma checkpoints on disk -> our weight names (= HF *ForCausalLM names), safely.

Only safetensors are read (never unpickled). Single files and sharded (`model.safetensors.index.json`) layouts,
and the text decoder of the multimodal checkpoints, are accepted. Any missing, extra or mis-shaped tensor is a
CheckpointError naming it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import GemmaPlan
from .errors import CheckpointError

# Text-decoder prefixes on disk, most specific first (spec 4.5, 5.10).
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
# Towers of the multimodal checkpoints that a text decoder does not use.
SKIPPED_PREFIXES = (
    "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
    "model.embed_vision.", "model.audio_tower.", "model.embed_audio.", "audio_tower.", "embed_vision.",
    "embed_audio.",
)
_SHARED_LAYER_KV = re.compile(r"^layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.weight$")
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors shards, in index order; refuses pickle-only checkpoints."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; point --model at a checkpoint directory")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: unreadable index ({err!r}); re-download it") from None
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {root}: {missing[:5]}; download them")
        return files
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    unsafe = sorted(p.name for p in root.iterdir() if p.suffix in UNSAFE_SUFFIXES)
    if unsafe:
        raise CheckpointError(
            f"{root} has only pickle weights ({', '.join(unsafe[:3])}), which are never unpickled here; convert "
            "them once where you trust the file: `python -c \"import transformers as t; "
            f"m = t.AutoModelForCausalLM.from_pretrained('{root}'); m.save_pretrained('{root}-safetensors')\"`"
        )
    raise CheckpointError(f"{root} has no *.safetensors weights; download the checkpoint's safetensors files")


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Path]]:
    """(tensor name on disk, file) for every tensor of the checkpoint, without loading any."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, path


def text_name(disk_name: str, plan: GemmaPlan) -> str | None:
    """Our name for a tensor stored on disk, or None for tensors a text decoder skips."""
    if disk_name.startswith(SKIPPED_PREFIXES):
        return None
    if disk_name in LM_HEAD_NAMES:
        return None if plan.tie_word_embeddings else "lm_head.weight"
    for prefix in TEXT_PREFIXES:
        if disk_name.startswith(prefix):
            inner = disk_name[len(prefix):]
            shared = _SHARED_LAYER_KV.match(inner)
            if shared and int(shared.group(1)) < plan.num_layers and plan.layers[int(shared.group(1))].shares_kv:
                return None  # KV-shared layers have no K/V of their own; HF discards these too (spec 5.4)
            return "model." + inner
    return disk_name


def load_state_dict(
    model_dir: str | Path,
    plan: GemmaPlan,
    expected: dict[str, torch.Size],
    dtype: torch.dtype | None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Read the text decoder's tensors, renamed to our names and cast to dtype (None: as stored), checked
    against `expected`."""
    from tqdm import tqdm

    sources: dict[str, tuple[Path, str]] = {}
    extra = []
    for disk_name, path in iter_tensors(model_dir):
        name = text_name(disk_name, plan)
        if name is None:
            continue
        if name not in expected:
            extra.append(disk_name)
        elif name in sources:
            raise CheckpointError(f"{model_dir}: tensor {name} is stored twice ({disk_name}); remove the duplicate")
        else:
            sources[name] = (path, disk_name)
    missing = sorted(set(expected) - set(sources))
    if missing:
        raise CheckpointError(
            f"{model_dir}: missing tensor {missing[0]} (expected shape {list(expected[missing[0]])})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + "; the checkpoint does not match its config.json"
        )
    if extra:
        raise CheckpointError(
            f"{model_dir}: unexpected tensor {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
            + "; the checkpoint does not match its config.json"
        )
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, disk_name) in sources.items():
        by_file.setdefault(path, []).append((name, disk_name))
    bar = tqdm(total=len(sources), desc="loading weights", unit="tensor", disable=not progress or len(sources) < 200)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name, disk_name in names:
                shape = tuple(f.get_slice(disk_name).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(
                        f"{path.name}: tensor {disk_name} has shape {list(shape)}, expected {list(expected[name])} "
                        "from config.json; the checkpoint does not match its config"
                    )
                tensor = f.get_tensor(disk_name)
                state[name] = tensor if dtype is None else tensor.to(dtype)
                bar.update()
    bar.close()
    return state


def expected_shapes(plan: GemmaPlan) -> dict[str, torch.Size]:
    """Every tensor a checkpoint of this plan must hold (HF *ForCausalLM names), from a weightless model."""
    from .cpu import GemmaForCausalLM

    with torch.device("meta"):
        return {name: t.shape for name, t in GemmaForCausalLM(plan).state_dict().items()}


def save_checkpoint(model_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], extra_files: dict[str, str]
                    | None = None) -> Path:
    """Write config.json + model.safetensors (+ extra text files) atomically: into a temporary sibling directory
    that is renamed into place only when complete."""
    target = Path(model_dir)
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"{target} exists and is not empty; choose a new output directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        if staging.exists():
            for p in staging.iterdir():
                p.unlink()
            staging.rmdir()
    return target
