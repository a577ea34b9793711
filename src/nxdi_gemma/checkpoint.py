"""Hugging Face Gemma checkpoints on disk -> our weight names (= HF *ForCausalLM names), safely.

Only safetensors are read (never unpickled). Single files and sharded (`model.safetensors.index.json`) layouts,
and the text decoder of the multimodal checkpoints, are accepted. Any missing, extra or mis-shaped tensor, and any
truncated file, is a CheckpointError naming it.

`check_checkpoint` validates a directory from config.json and the safetensors headers alone (no tensor data is
read), so the commands run it before Hugging Face or NxDI touch the directory. Expected shapes come from the plan
and the shared layers (`layers.py`), never from a runtime.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import GemmaPlan, load_plan
from .errors import CheckpointError
from .layers import AttentionWeights, GemmaBlock, make_norm

# Text-decoder prefixes on disk, most specific first (spec 4.5, 5.10).
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
# Towers of the multimodal checkpoints that a text decoder does not use.
SKIPPED_PREFIXES = (
    "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
    "model.embed_vision.", "model.audio_tower.", "model.embed_audio.", "audio_tower.", "embed_vision.",
    "embed_audio.",
    # Gemma 4 12B (gemma4_unified): its patch embedder is saved as vision_embedder.* (HF renames it on load).
    "model.vision_embedder.", "vision_embedder.",
)
_SHARED_LAYER_KV = re.compile(r"^layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.weight$")
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Bytes per element of the safetensors dtypes whose size is a whole number of bytes.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
MISMATCH = "the weights do not match config.json; use the config.json they were saved with (or re-download both)"


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


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, from its header alone; a file whose header
    promises more bytes than it holds (an interrupted download) is refused here, before anything reads it."""
    size = path.stat().st_size
    redo = "re-download or re-convert it"
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file; {redo}")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: truncated or not safetensors (header of {header_len} bytes, file of {size}); {redo}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err}); {redo}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; {redo}")
    header.pop("__metadata__", None)
    out, spans = {}, []
    for name, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: malformed safetensors entry for tensor {name}; {redo}")
        if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path}: tensor {name} ({dtype} {shape}) spans {offsets[1] - offsets[0]} bytes, expected "
                f"{math.prod(shape) * DTYPE_BYTES[dtype]}; the file is corrupt, {redo}"
            )
        out[name] = (dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    # The format requires the tensors to tile the data region exactly (safetensors refuses the file otherwise).
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{path}: tensor {name} starts at byte {begin}, expected {end}; the file is corrupt, "
                                  f"{redo}")
        end = stop
    data = size - 8 - header_len
    if end > data:
        raise CheckpointError(
            f"{path}: truncated: its header describes {end} bytes of tensor data but the file holds {data}; {redo}"
        )
    if end < data:
        raise CheckpointError(f"{path}: {data - end} bytes after the last tensor; the file is corrupt, {redo}")
    return out


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Path, tuple[int, ...]]]:
    """(tensor name on disk, file, shape) for every tensor of the checkpoint, from the headers (no data read)."""
    for path in safetensors_files(model_dir):
        for name, (_, shape) in read_header(path).items():
            yield name, path, shape


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


def match_tensors(
    model_dir: str | Path, plan: GemmaPlan, expected: dict[str, torch.Size]
) -> dict[str, tuple[Path, str]]:
    """our name -> (file, name on disk) for every expected tensor, after checking names and shapes against
    `expected` from the safetensors headers alone."""
    sources: dict[str, tuple[Path, str]] = {}
    extra = []
    for disk_name, path, shape in iter_tensors(model_dir):
        name = text_name(disk_name, plan)
        if name is None:
            continue
        if name not in expected:
            extra.append(disk_name)
        elif name in sources:
            raise CheckpointError(f"{model_dir}: tensor {name} is stored twice ({disk_name}); remove the duplicate")
        elif shape != tuple(expected[name]):
            raise CheckpointError(
                f"{path}: tensor {disk_name} has shape {list(shape)}, expected {list(expected[name])} from "
                f"config.json; {MISMATCH}"
            )
        else:
            sources[name] = (path, disk_name)
    missing = sorted(set(expected) - set(sources))
    if missing:
        raise CheckpointError(
            f"{model_dir}: missing tensor {missing[0]} (expected shape {list(expected[missing[0]])})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + f"; {MISMATCH}"
        )
    if extra:
        raise CheckpointError(
            f"{model_dir}: unexpected tensor {extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
            + f"; {MISMATCH}"
        )
    return sources


def check_checkpoint(model_dir: str | Path, prequantized: bool = False) -> GemmaPlan:
    """The plan of a checkpoint directory whose config.json we can run and whose safetensors hold exactly the
    tensors it implies, checked from config.json and the file headers (cheap: no tensor data is read). The commands
    call this before Hugging Face or NxDI open the directory, so a bad checkpoint is one CheckpointError or
    ConfigError line and pickle files are never reached. A pre-quantized FP8 checkpoint (compressed-tensors,
    ModelOpt) passes only with `prequantized` (a run with quantized weights, which converts it: quantize.py)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such directory; point --model at a local checkpoint directory")
    plan = load_plan(root)
    from .quantize import check_not_foreign  # here, not at the top: quantize imports this module

    fmt = check_not_foreign(root)  # a pre-quantized Hub checkpoint: refused naming its format unless convertible
    if fmt is None:
        match_tensors(root, plan, expected_shapes(plan))
        return plan
    if not prequantized:
        raise CheckpointError(f"{root}: a pre-quantized {fmt} checkpoint, which runs only as fp8 weights on "
                              "Neuron: compile with neuron config quantized=true, quantization_dtype=f8e4m3, "
                              "quantized_checkpoints_path=DIR (converted there on first use), or convert it with "
                              f"`nxdi-gemma quantize --dtype fp8 --model {root} --out DIR`")
    from .quantize import match_prequantized

    match_prequantized(root, plan, fmt)
    return plan


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

    sources = match_tensors(model_dir, plan, expected)
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, disk_name) in sources.items():
        by_file.setdefault(path, []).append((name, disk_name))
    bar = tqdm(total=len(sources), desc="loading weights", unit="tensor", disable=not progress or len(sources) < 200)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name, disk_name in names:
                tensor = f.get_tensor(disk_name)
                state[name] = tensor if dtype is None else tensor.to(dtype)
                bar.update()
    bar.close()
    return state


class _TextWeights(nn.Module):
    """The text decoder's parameters under HF's names below `model.`."""

    def __init__(self, plan: GemmaPlan):
        super().__init__()
        self.embed_tokens = nn.Embedding(plan.vocab_size, plan.hidden_size)
        self.layers = nn.ModuleList(GemmaBlock(plan, layer, AttentionWeights(plan, layer)) for layer in plan.layers)
        self.norm = make_norm(plan, plan.hidden_size)
        if plan.ple_dim:
            self.embed_tokens_per_layer = nn.Embedding(plan.ple_vocab_size, plan.num_layers * plan.ple_dim)
            self.per_layer_model_projection = nn.Linear(plan.hidden_size, plan.num_layers * plan.ple_dim, bias=False)
            self.per_layer_projection_norm = make_norm(plan, plan.ple_dim)


def expected_shapes(plan: GemmaPlan) -> dict[str, torch.Size]:
    """Every tensor a checkpoint of this plan must hold (HF *ForCausalLM names), from weightless (meta) modules."""
    with torch.device("meta"):
        shapes = {f"model.{name}": t.shape for name, t in _TextWeights(plan).state_dict().items()}
    if not plan.tie_word_embeddings:
        shapes["lm_head.weight"] = torch.Size([plan.vocab_size, plan.hidden_size])
    return shapes


def save_checkpoint(model_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], extra_files: dict[str, str]
                    | None = None, metadata: dict[str, str] | None = None) -> Path:
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
                  metadata={"format": "pt", **(metadata or {})})
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
