"""Weight quantization for the NxDI classes: a Hugging Face safetensors checkpoint -> a quantized safetensors
checkpoint that NxD's quantized layers load, and the checks that read one back. Never unpickles; no NxDI import.

What is quantized (HF names; everything else stays in the checkpoint's dtype): the attention projections
`model.layers.N.self_attn.{q,k,v,o}_proj.weight`, the dense MLP `model.layers.N.mlp.{gate,up,down}_proj.weight` and
the Gemma 4 routed experts `model.layers.N.experts.{gate_up_proj,down_proj}`. Embeddings, the LM head, norms, the
MoE router and the PLE tables/projections stay in the model dtype. `modules_to_not_convert` (NxD's semantics: a
module whose path below `model.` contains one of the strings, e.g. `layers.0.mlp`) moves more out.

The LM head is quantized on request only (`Scheme.lm_head`; neuron config `quantize_lm_head: true`, `nxdi-gemma
quantize --lm-head`): the checkpoint then holds `lm_head.weight` (int8/fp8, [vocab, hidden]) and `lm_head.scale`
(one scale per vocab row, or [1] per tensor), quantized from the embedding table when the head is tied; the
embedding table itself stays in the model dtype (a step gathers one row of it, the head reads all of it).

Scheme (symmetric, zero point 0), per tensor `w` in float32:
- per_channel (default): one scale per output channel (row of a linear weight [out, in]; per expert and output
  channel for the experts): `scale = max(amax / QMAX, eps)`, shape [out, 1] (NxD's per-channel scale, axis 0);
  experts: `gate_up_proj_scale` [E, 2*Ie, 1], `down_proj_scale` [E, H, 1].
- per_tensor: one scale per tensor (per expert for the experts): shape [1]; experts [E, 1, 1].
- int8: `q = clamp(round_half_even(w * (1 / scale)), -128, 127)` in float32, as torch's `quantize_per_channel`
  (what NxD's observers feed) rounds; QMAX 127, eps = float32 eps (NxD's PerChannelAbsMaxObserver).
- fp8 (`f8e4m3`): `q = float8_e4m3fn(clamp(w / scale, -240, 240))`, QMAX 240: Neuron's e4m3 range (NxD's
  DtypeBound.F8E4M3_MAX; NxDI compiles FP8 with `--experimental-unsafe-fp8e4m3fn-as-fp8e4m3`).
The layers dequantize after the matmul: `(x @ q^T) * scale` (NxD's QuantizedColumnParallel/RowParallel), so no
dequantized copy of a weight exists in the graph.

The quantized checkpoint is a directory with config.json (the source's) and model.safetensors, written atomically,
whose metadata records the scheme (`nxdi_gemma.quantization`: dtype, scheme, modules_to_not_convert); loading
checks it against the neuron config and every tensor's name, dtype and shape against the plan.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_checkpoint, expected_shapes, load_state_dict, read_header, safetensors_files
from .config import GemmaPlan, load_plan, read_config_json, text_config_of
from .errors import CheckpointError, ConfigError

METADATA_KEY = "nxdi_gemma.quantization"
# Our dtype names -> NxDI's quantization_dtype, torch dtype, safetensors dtype, largest quantized magnitude.
DTYPES = {
    "int8": ("int8", torch.int8, "I8", 127.0),
    "fp8": ("f8e4m3", torch.float8_e4m3fn, "F8_E4M3", 240.0),
}
NXDI_DTYPES = {nxdi: ours for ours, (nxdi, *_rest) in DTYPES.items()}
SCHEMES = {"per_channel": "per_channel_symmetric", "per_tensor": "per_tensor_symmetric"}
NXDI_SCHEMES = {nxdi: ours for ours, nxdi in SCHEMES.items()}
EPS = torch.finfo(torch.float32).eps
_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.experts\.(gate_up_proj|down_proj)$")
# Formats of pre-quantized checkpoints found on the Hub, recognised to refuse them by name (see check_not_foreign).
_FOREIGN_SUFFIXES = {"weight_scale": "FP8 compressed-tensors / ModelOpt (per-channel weight_scale)",
                     "weight_scale_inv": "FP8 block-quantized (weight_scale_inv)", "qweight": "GPTQ/AWQ (qweight)",
                     "weight_packed": "compressed-tensors packed int4 (weight_packed)"}


@dataclass(frozen=True)
class Scheme:
    dtype: str  # "int8" | "fp8"
    scheme: str  # "per_channel" | "per_tensor"
    modules_to_not_convert: tuple[str, ...] = ()
    lm_head: bool = False  # the LM head quantized too (opt-in; the embedding table stays in the model dtype)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"quantization dtype {self.dtype!r} is not supported; choose int8 or fp8")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"quantization scheme {self.scheme!r} is not supported; choose per_channel or per_tensor")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "scheme": self.scheme, "modules_to_not_convert": list(self.modules_to_not_convert),
                "lm_head": self.lm_head}

    @classmethod
    def from_neuron_config(cls, neuron_config) -> Scheme:
        """The scheme a NeuronConfig asks for (NxDI's field values), or a ConfigError naming what it cannot run."""
        dtype = getattr(neuron_config, "quantization_dtype", "int8")
        kind = getattr(neuron_config, "quantization_type", "per_tensor_symmetric")
        if dtype not in NXDI_DTYPES:
            raise ConfigError(f"neuron config quantization_dtype={dtype!r} is not supported; choose "
                              f"{' or '.join(NXDI_DTYPES)}")
        if kind not in NXDI_SCHEMES:
            raise ConfigError(f"neuron config quantization_type={kind!r} is not supported; choose "
                              f"{' or '.join(NXDI_SCHEMES)}")
        skip = getattr(neuron_config, "modules_to_not_convert", None) or []
        return cls(NXDI_DTYPES[dtype], NXDI_SCHEMES[kind], tuple(user_modules_to_not_convert(skip)),
                   bool(getattr(neuron_config, "quantize_lm_head", False)))


# Paths of our NxDI modules that NxD's converter never swaps (NxD's substring match): the PLE projection lives
# under embed_tokens, the routed experts are quantized by our own module (moe.py) and the LM head, when quantized
# (`quantize_lm_head`), by our own head class (neuron/lm_head.py), never by NxD's converter.
ALWAYS_NOT_CONVERTED = ("embed_tokens", "lm_head", "experts")
LM_HEAD = "lm_head.weight"  # the quantized checkpoint's name of the head (HF's, also for a tied head)


def check_neuron_config(kwargs: dict, quantize_lm_head: bool = False) -> None:
    """Refuse, before NxDI's asserts, quantization settings our classes cannot run; extend modules_to_not_convert
    with what NxD's converter must not swap; turn `kv_cache_quant` into NxDI's kv_quant_config. Runs on the raw
    NeuronConfig kwargs; `quantize_lm_head` is our neuron-config field (taken out of them by GemmaNeuronConfig)."""
    check_kv_cache_quant(kwargs)
    if quantize_lm_head and not kwargs.get("quantized", False):
        raise ConfigError("neuron config quantize_lm_head=true without quantized=true; set quantized (and "
                          "quantized_checkpoints_path) too")
    if kwargs.get("kv_cache_quant") and (kwargs.get("is_block_kv_layout") or kwargs.get("is_prefix_caching")):
        raise ConfigError("neuron config kv_cache_quant with the block KV layout (prefix caching) is not supported: "
                          "the fp8 cache is implemented for the contiguous layout only; turn one off (vLLM: "
                          "--no-enable-prefix-caching)")
    if not kwargs.get("quantized", False):
        if kwargs.get("quantized_checkpoints_path"):
            raise ConfigError("neuron config sets quantized_checkpoints_path without quantized=true; set both")
        return
    if not kwargs.get("quantized_checkpoints_path"):
        raise ConfigError("neuron config quantized=true needs quantized_checkpoints_path (a directory; written from "
                          "the model on first use if it does not exist)")
    if kwargs.get("activation_quantization_type"):
        raise ConfigError(f"neuron config activation_quantization_type={kwargs['activation_quantization_type']!r} "
                          "is not supported; nxdi-gemma quantizes weights only")
    if kwargs.get("lora_config") is not None:
        raise ConfigError("neuron config quantized=true with LoRA serving (lora_config) is not supported: NxDI's "
                          "LoRA wraps the unquantized linears; serve adapters on the unquantized model")
    if kwargs.get("quantized_mlp_kernel_enabled"):
        raise ConfigError("neuron config quantized_mlp_kernel_enabled is not supported (every NKI kernel is off)")
    kwargs.setdefault("quantization_type", "per_channel_symmetric")  # ours: per channel by default (NxDI: tensor)
    scheme = Scheme.from_neuron_config(_Fields(kwargs))
    if scheme.scheme == "per_tensor" and kwargs.get("fused_qkv"):
        raise ConfigError("neuron config fused_qkv with quantization_type=per_tensor_symmetric: q, k and v have "
                          "one scale each, the fused projection one; use per_channel_symmetric or fused_qkv=false")
    skip = list(kwargs.get("modules_to_not_convert") or [])
    kwargs["modules_to_not_convert"] = skip + [m for m in ALWAYS_NOT_CONVERTED if m not in skip]


KV_CACHE_DTYPES = {"f8e4m3": torch.float8_e4m3fn}


def check_kv_cache_quant(kwargs: dict) -> None:
    """`kv_cache_quant: true` (NxDI's switch; NxDI's KVCacheManager acts on `kv_quant_config`, which NxDI's own
    demo builds from it): K/V stored as fp8 e4m3 by a plain cast (NxDI's direct-cast KVQuantizationConfig, its
    default) and cast back where read. int8 and scaled (non-direct-cast) caches are refused. In NxDI 0.8 and 0.9
    (KVCacheManager._quantize_cache/_dequantize_cache, KVQuantizationConfig) an int8 cache can only be the scaled
    path: `direct_cast` casts K/V straight to int8 (rounds them to integers), and with direct_cast=false K/V are
    divided by static per-layer `k_scales`/`v_scales` parameters that `_init_scale_buffers` creates as ones and
    that no code in NxDI, NxD or vllm-neuron calibrates, computes or loads (no checkpoint key, no calibration step):
    an int8 cache there is `round(K)` clamped to [-128, 127]."""
    config = kwargs.get("kv_quant_config")
    if not kwargs.get("kv_cache_quant", False):
        if config is not None:
            raise ConfigError("neuron config sets kv_quant_config without kv_cache_quant=true; set both")
        return
    config = dict(config or {})
    if not isinstance(kwargs.get("kv_quant_config") or {}, dict):
        raise ConfigError("neuron config kv_quant_config must be an object, e.g. {\"quant_dtype\": \"f8e4m3\"}")
    for method in ("k_quant_method", "v_quant_method"):  # as neuron_config.json stores NxDI's default enum
        if "per_tensor" not in str(config.pop(method, "per_tensor")):
            raise ConfigError(f"neuron config kv_quant_config {method}: only per-tensor direct cast is supported")
    dtype = config.pop("quant_dtype", "f8e4m3")
    dtype = {"float8_e4m3fn": "f8e4m3"}.get(dtype, dtype)  # neuron_config.json's spelling of the torch dtype
    if dtype not in KV_CACHE_DTYPES and dtype not in KV_CACHE_DTYPES.values():
        raise ConfigError(f"neuron config kv_quant_config quant_dtype={dtype!r} is not supported: only f8e4m3 (a "
                          "direct cast); NxDI's int8 KV cache divides K/V by per-layer scales that are fixed at 1 "
                          "and that nothing calibrates or loads, i.e. it rounds K/V to integers")
    if not config.pop("direct_cast", True) or config:
        raise ConfigError(f"neuron config kv_quant_config {kwargs['kv_quant_config']!r}: only the direct-cast "
                          "f8e4m3 cache is supported (no scales, no per-key/channel methods)")
    kwargs["kv_quant_config"] = {"quant_dtype": KV_CACHE_DTYPES.get(dtype, dtype), "direct_cast": True}


class _Fields:
    def __init__(self, kwargs: dict):
        self.__dict__.update(kwargs)


def user_modules_to_not_convert(names: list[str]) -> list[str]:
    return [n for n in names if n not in ALWAYS_NOT_CONVERTED]


def is_quantized_name(name: str, plan: GemmaPlan, skip: tuple[str, ...] = ()) -> bool:
    """Whether the HF tensor `name` is quantized under a scheme excluding the module paths in `skip`."""
    match = _LINEAR.match(name) or _EXPERTS.match(name)
    if not match or int(match.group(1)) >= plan.num_layers:
        return False
    path = name.removeprefix("model.").removesuffix(".weight")
    return not any(s in path for s in skip)


def scale_name(name: str) -> str:
    """`...q_proj.weight` -> `...q_proj.scale` (NxD's name); experts `...gate_up_proj` -> `...gate_up_proj_scale`."""
    return name[: -len("weight")] + "scale" if name.endswith(".weight") else name + "_scale"


def scale_shape(shape: tuple[int, ...], scheme: str) -> tuple[int, ...]:
    if len(shape) == 3:  # experts [E, out, in]: per expert
        return (shape[0], shape[1], 1) if scheme == "per_channel" else (shape[0], 1, 1)
    return (shape[0], 1) if scheme == "per_channel" else (1,)


def quantize_tensor(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized weight, float32 scale) of one weight [out, in] or experts [E, out, in] (see the module docstring)."""
    w32 = w.float()
    qmax = DTYPES[scheme.dtype][3]
    # per channel: over the input dim; per tensor: the whole matrix (of each expert)
    reduce = (w.dim() - 1,) if scheme.scheme == "per_channel" else (w.dim() - 2, w.dim() - 1)
    amax = w32.abs().amax(dim=reduce, keepdim=True)
    scale = torch.clamp(amax / qmax, min=EPS)
    if scheme.dtype == "int8":
        q = torch.round(w32 * (1.0 / scale)).clamp(-128, 127).to(torch.int8)
    else:
        q = (w32 / scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    return q, scale.reshape(scale_shape(tuple(w.shape), scheme.scheme)).contiguous()


def quantize_state_dict(state: dict[str, torch.Tensor], plan: GemmaPlan, scheme: Scheme) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_quantized_name(name, plan, scheme.modules_to_not_convert):
            out[name], out[scale_name(name)] = quantize_tensor(tensor, scheme)
        else:
            out[name] = tensor
    return with_quantized_head(out, scheme)


def head_weight(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LM head's weight [vocab, hidden] in the model dtype: its own, or the embedding table it is tied to."""
    return state[LM_HEAD] if LM_HEAD in state else state["model.embed_tokens.weight"]


def with_quantized_head(state: dict[str, torch.Tensor], scheme: Scheme) -> dict[str, torch.Tensor]:
    """`state` (HF names) plus, when the scheme quantizes the LM head, `lm_head.weight` quantized and its scale
    (per vocab row): a tied head gets its own quantized copy, the embedding table stays as it is."""
    if scheme.lm_head:
        state[LM_HEAD], state[scale_name(LM_HEAD)] = quantize_tensor(head_weight(state), scheme)
    return state


def expected_quantized(plan: GemmaPlan, scheme: Scheme) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """name -> (safetensors dtype or None for 'the model's float dtype', shape) of a quantized checkpoint."""
    out: dict[str, tuple[str | None, tuple[int, ...]]] = {}
    qdtype = DTYPES[scheme.dtype][2]
    for name, shape in expected_shapes(plan).items():
        if is_quantized_name(name, plan, scheme.modules_to_not_convert):
            out[name] = (qdtype, tuple(shape))
            out[scale_name(name)] = ("F32", scale_shape(tuple(shape), scheme.scheme))
        else:
            out[name] = (None, tuple(shape))
    if scheme.lm_head:
        shape = (plan.vocab_size, plan.hidden_size)
        out[LM_HEAD] = (qdtype, shape)
        out[scale_name(LM_HEAD)] = ("F32", scale_shape(shape, scheme.scheme))
    return out


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, scheme: Scheme) -> Path:
    """Quantize a checkpoint directory into a new directory (atomic: a temporary sibling renamed when complete)."""
    from .checkpoint import save_checkpoint

    plan = check_checkpoint(model_dir, prequantized=True)
    fmt = check_not_foreign(model_dir)
    if fmt is not None:  # pre-quantized FP8: converted, not quantized again
        tensors = convert_prequantized(model_dir, plan, scheme, fmt)
    else:
        tensors = quantize_state_dict(load_state_dict(model_dir, plan, expected_shapes(plan), dtype=None), plan,
                                      scheme)
    return save_checkpoint(out_dir, read_config_json(model_dir), tensors,
                           metadata={METADATA_KEY: json.dumps(scheme.to_json(), sort_keys=True)})


# Pre-quantized FP8 checkpoints converted at load (`convert_prequantized`), by config.json's quant_method.
FP8_COMPRESSED_TENSORS = "FP8 compressed-tensors"
FP8_MODELOPT = "FP8 ModelOpt"
# Tensors of those formats that describe activations or the KV cache, which NxDI's weight-only scheme leaves in the
# model dtype: read past, not converted.
_IGNORED_SCALES = ("input_scale", "k_scale", "v_scale")
F8E4M3_NEURON_MAX = 240.0  # Neuron's e4m3 (NxD's DtypeBound.F8E4M3_MAX); torch's float8_e4m3fn reaches 448


def _quantization_config(model_dir: str | Path) -> dict | None:
    config = read_config_json(model_dir)
    quant = config.get("quantization_config") or text_config_of(config)[1].get("quantization_config")
    modelopt = Path(model_dir) / "hf_quant_config.json"
    if quant is None and modelopt.is_file():  # ModelOpt's own export (older ones carry no quantization_config)
        try:
            doc = json.loads(modelopt.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{modelopt}: not JSON; re-download it") from None
        quant = {"quant_method": "modelopt", **(doc.get("quantization") or {})} if isinstance(doc, dict) else {}
    return quant if isinstance(quant, dict) or quant is None else {"quant_method": repr(quant)}


def check_not_foreign(model_dir: str | Path) -> str | None:
    """None for an unquantized checkpoint; FP8_COMPRESSED_TENSORS or FP8_MODELOPT for a pre-quantized FP8 checkpoint
    with per-channel or per-tensor weight scales (converted by `convert_prequantized`); any other pre-quantized
    format (block FP8, int4, GPTQ/AWQ, NVFP4, ...) is refused in one line naming it."""
    quant = _quantization_config(model_dir)
    refuse = ("that is not converted; give the unquantized checkpoint and set quantized=true (or run `nxdi-gemma "
              "quantize`)")
    if quant is None:
        names = [n for path in safetensors_files(model_dir) for n in read_header(path)]
        for suffix, what in _FOREIGN_SUFFIXES.items():
            hit = next((n for n in names if n.endswith("." + suffix)), None)
            if hit:
                raise CheckpointError(f"{model_dir}: a pre-quantized {what} checkpoint (tensor {hit}) without a "
                                      f"config.json quantization_config, a format {refuse}")
        return None
    method = str(quant.get("quant_method") or quant.get("quant_algo") or "unknown")
    if method == "compressed-tensors":
        groups = quant.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        bad = [w for w in weights if not (w.get("num_bits") == 8 and w.get("type") == "float"
                                          and w.get("strategy", "tensor") in ("channel", "tensor")
                                          and w.get("symmetric", True))]
        if not weights or bad:
            w = bad[0] if bad else {}
            what = (f"{w.get('num_bits')}-bit {w.get('type')} weights, strategy {w.get('strategy')}" if bad else
                    "no weight quantization in config_groups")
            raise CheckpointError(f"{model_dir}: a pre-quantized compressed-tensors checkpoint ({what}; format "
                                  f"{quant.get('format')}) {refuse}; only FP8 per-channel or per-tensor weights are "
                                  "converted")
        return FP8_COMPRESSED_TENSORS
    if method == "modelopt":
        algo = quant.get("quant_algo")
        if algo != "FP8":
            raise CheckpointError(f"{model_dir}: a pre-quantized ModelOpt {algo} checkpoint {refuse}; only ModelOpt "
                                  "FP8 is converted")
        return FP8_MODELOPT
    raise CheckpointError(f"{model_dir}: config.json has a quantization_config ({method}), a pre-quantized "
                          f"checkpoint {refuse}")


def match_prequantized(model_dir: str | Path, plan: GemmaPlan, fmt: str) -> dict[str, dict[str, tuple[Path, str]]]:
    """our name -> {"weight": (file, disk name)[, "scale": (file, disk name)]} of a pre-quantized FP8 checkpoint,
    from the headers: every tensor of the plan with its shape, float8_e4m3fn weights each with a per-channel
    ([out, 1] or [out]) or per-tensor ([] or [1]) float scale, nothing else but activation / KV-cache scales."""
    from .checkpoint import MISMATCH, iter_tensors, text_name

    expected = expected_shapes(plan)
    found: dict[str, dict[str, tuple[Path, str]]] = {}
    headers = {}
    for disk_name, path, _shape in iter_tensors(model_dir):
        headers[disk_name] = read_header(path)[disk_name]
        base, _, suffix = disk_name.rpartition(".")
        if suffix in _IGNORED_SCALES:
            continue
        kind = "scale" if suffix == "weight_scale" else "weight"
        name = text_name(base + ".weight" if kind == "scale" else disk_name, plan)
        if name is None:
            continue
        if name not in expected:
            raise CheckpointError(f"{model_dir}: unexpected tensor {disk_name} in a {fmt} checkpoint; {MISMATCH}")
        found.setdefault(name, {})[kind] = (path, disk_name)
    for name, shape in expected.items():
        entry = found.get(name, {})
        if "weight" not in entry:
            raise CheckpointError(f"{model_dir}: missing tensor {name} (expected shape {list(shape)}); {MISMATCH}")
        path, disk_name = entry["weight"]
        dtype, got = headers[disk_name]
        if got != tuple(shape):
            raise CheckpointError(f"{path}: tensor {disk_name} has shape {list(got)}, expected {list(shape)} from "
                                  f"config.json; {MISMATCH}")
        if dtype.startswith("F8") != ("scale" in entry) or dtype not in ("F8_E4M3", "BF16", "F16", "F32"):
            what = "has no weight_scale" if dtype.startswith("F8") else f"is {dtype} with a weight_scale"
            raise CheckpointError(f"{path}: tensor {disk_name} {what}; a {fmt} checkpoint stores float8_e4m3fn "
                                  "weights each with its weight_scale (re-download it)")
        if "scale" in entry:
            if len(shape) != 2:
                raise CheckpointError(f"{path}: {disk_name} is an FP8 {len(shape)}-D tensor (routed experts?); "
                                      f"{fmt} experts are not converted: give the unquantized checkpoint")
            spath, sname = entry["scale"]
            sdtype, sshape = headers[sname]
            if sshape not in ((), (1,), (shape[0],), (shape[0], 1)) or sdtype not in ("F32", "BF16", "F16"):
                raise CheckpointError(f"{spath}: {sname} is {sdtype} {list(sshape)}; expected a float scale per "
                                      f"output channel [{shape[0]}, 1] or per tensor [] for weight {list(shape)}")
    return found


def check_prequantized_scheme(model_dir: str | Path, quantization_dtype: str, quantization_type: str) -> None:
    """Before compiling: a pre-quantized FP8 checkpoint is converted only to fp8 per channel (see
    convert_prequantized); any other neuron-config scheme is one line now rather than at load."""
    fmt = check_not_foreign(model_dir)
    if fmt is not None and (quantization_dtype, quantization_type) != ("f8e4m3", "per_channel_symmetric"):
        raise ConfigError(f"{model_dir} is a pre-quantized {fmt} checkpoint: it is converted to fp8 per channel only "
                          f"(the neuron config asks for {quantization_dtype} {quantization_type}); set "
                          "quantization_dtype=f8e4m3 and quantization_type=per_channel_symmetric")


def convert_prequantized(model_dir: str | Path, plan: GemmaPlan, scheme: Scheme, fmt: str) -> dict[str, torch.Tensor]:
    """A pre-quantized FP8 checkpoint (`check_not_foreign`) as our fp8 per-channel scheme, dequantizing to the same
    values: each FP8 weight q with scale s (per channel, or per tensor spread over the channels). Neuron's e4m3
    stops at 240 where float8_e4m3fn reaches 448 (NxDI reads e4m3fn bits as e4m3), so a channel whose |q| exceeds
    240 is stored as q / 2 with scale 2 s: exact wherever q / 2 is a normal e4m3 value; only codes |q| < 2^-5 (below
    1e-4 of the channel's range) with an odd last bit round, by at most 2^-9 s. Weights the scheme quantizes but the source stored
    unquantized are quantized here (`quantize_tensor`); FP8 weights the scheme keeps in the model dtype
    (modules_to_not_convert, the LM head) are dequantized to the checkpoint's dtype. Activation and KV-cache scales
    (input_scale, k_scale, v_scale) are read past: NxDI's scheme quantizes weights only."""
    from safetensors import safe_open

    if scheme.dtype != "fp8" or scheme.scheme != "per_channel":
        raise ConfigError(f"{model_dir} is a pre-quantized {fmt} checkpoint: it is converted to fp8 per channel "
                          f"only (asked for {scheme.dtype} {scheme.scheme}, which would round its weights a second "
                          "time); use --dtype fp8 --scheme per_channel (neuron config quantization_dtype=f8e4m3, "
                          "quantization_type=per_channel_symmetric)")
    found = match_prequantized(model_dir, plan, fmt)
    config = read_config_json(model_dir)
    text = text_config_of(config)[1]
    model_dtype = getattr(torch, str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype")
                                     or config.get("dtype") or "bfloat16"))
    out: dict[str, torch.Tensor] = {}
    for name, entry in found.items():
        with safe_open(str(entry["weight"][0]), framework="pt") as f:
            tensor = f.get_tensor(entry["weight"][1])
        quantized = is_quantized_name(name, plan, scheme.modules_to_not_convert)
        if "scale" not in entry:
            if quantized:
                out[name], out[scale_name(name)] = quantize_tensor(tensor, scheme)
            else:
                out[name] = tensor
            continue
        with safe_open(str(entry["scale"][0]), framework="pt") as f:
            scale = f.get_tensor(entry["scale"][1]).float().reshape(-1, 1).expand(tensor.shape[0], 1)
        if not quantized:
            out[name] = (tensor.float() * scale).to(model_dtype)
            continue
        halve = tensor.float().abs().amax(dim=1, keepdim=True) > F8E4M3_NEURON_MAX
        out[name] = torch.where(halve, tensor.float() / 2, tensor.float()).to(torch.float8_e4m3fn)
        out[scale_name(name)] = torch.where(halve, 2 * scale, scale).contiguous()
    return with_quantized_head(out, scheme)  # Hub FP8 checkpoints keep the head unquantized ("ignore": lm_head)


def read_scheme(qdir: str | Path) -> Scheme:
    """The scheme recorded in a quantized checkpoint written by `quantize_checkpoint` (headers only)."""
    files = safetensors_files(qdir)
    with files[0].open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))  # read_header validated the file
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(f"{qdir}: not a quantized checkpoint written by `nxdi-gemma quantize` (no "
                              f"{METADATA_KEY} metadata); delete it to have it written again, or run the command")
    try:
        doc = json.loads(raw)
        # "lm_head" absent: written before the head could be quantized, i.e. a model-dtype head
        return Scheme(doc["dtype"], doc["scheme"], tuple(doc["modules_to_not_convert"]), bool(doc.get("lm_head")))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{qdir}: unreadable {METADATA_KEY} metadata; re-run `nxdi-gemma quantize`") from None


def check_quantized_checkpoint(qdir: str | Path, model_dir: str | Path | None, plan: GemmaPlan,
                               scheme: Scheme) -> None:
    """A quantized checkpoint matching this model and scheme, from config.json and the headers (no tensor data)."""
    qdir = Path(qdir)
    if not qdir.is_dir():
        raise CheckpointError(f"{qdir}: no such quantized checkpoint directory")
    headers = {}
    for path in safetensors_files(qdir):
        headers.update({name: (path, *info) for name, info in read_header(path).items()})  # truncation refused here
    stored = read_scheme(qdir)
    if stored.lm_head != scheme.lm_head:
        raise CheckpointError(
            f"{qdir}: quantized {'with' if stored.lm_head else 'without'} the LM head, but the neuron config has "
            f"quantize_lm_head={'true' if scheme.lm_head else 'false'}; set quantize_lm_head="
            f"{'true' if stored.lm_head else 'false'} or point quantized_checkpoints_path at a new directory")
    if stored != scheme:
        raise CheckpointError(f"{qdir}: quantized as {stored.to_json()}, but the neuron config asks for "
                              f"{scheme.to_json()}; point quantized_checkpoints_path at a new directory")
    if model_dir is not None and text_config_of(read_config_json(qdir))[1] != text_config_of(
            read_config_json(model_dir))[1]:
        raise CheckpointError(f"{qdir}: its config.json is not {model_dir}'s: a quantized checkpoint of another "
                              "model; point quantized_checkpoints_path at a new directory")
    expected = expected_quantized(plan, scheme)
    for name, (dtype, shape) in expected.items():
        if name not in headers:
            raise CheckpointError(f"{qdir}: missing tensor {name}; re-run `nxdi-gemma quantize`")
        path, got_dtype, got_shape = headers[name]
        if got_shape != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(got_shape)}, expected {list(shape)} for "
                                  f"{scheme.dtype} {scheme.scheme}; re-run `nxdi-gemma quantize`")
        if dtype is not None and got_dtype != dtype:
            raise CheckpointError(f"{path}: tensor {name} is {got_dtype}, expected {dtype}; re-run `nxdi-gemma "
                                  "quantize`")
    extra = sorted(set(headers) - set(expected))
    if extra:
        raise CheckpointError(f"{qdir}: unexpected tensor {extra[0]}; re-run `nxdi-gemma quantize`")


def load_quantized(qdir: str | Path, plan: GemmaPlan, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The tensors of a checked quantized checkpoint under our HF names (safetensors only)."""
    from safetensors import safe_open

    state = {}
    for path in safetensors_files(qdir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[name] = f.get_tensor(name)
    return state


def ensure_quantized(model_dir: str | Path, qdir: str | Path, scheme: Scheme) -> GemmaPlan:
    """First use: write the quantized checkpoint if it does not exist yet; then check it. Returns the plan."""
    plan = load_plan(model_dir)
    qdir = Path(qdir)
    qdir.parent.mkdir(parents=True, exist_ok=True)
    # Every process of one launch (one per TP rank in NxDI's CPU mode) gets here: the first writes, under an
    # exclusive lock on the parent directory, the others wait and then find it.
    fd = os.open(qdir.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not qdir.exists():
            quantize_checkpoint(model_dir, qdir, scheme)
    finally:
        os.close(fd)  # releases the lock
    check_quantized_checkpoint(qdir, model_dir, plan, scheme)
    return plan


def int8_rounded_reference(state: dict[str, torch.Tensor], plan: GemmaPlan,
                           lm_head: bool = False) -> dict[str, torch.Tensor]:
    """The HF checkpoint with every weight the default scheme quantizes replaced by its int8-rounded value, as
    float32: the reference HF transformers runs to check the quantized NxDI classes. Written independently of
    `quantize_tensor`: torch's own per-channel quantizer (`torch.quantize_per_channel`, qint8, zero point 0) with
    the scale max|w| / 127 of each output channel (per expert for the experts). `lm_head`: the LM head rounded too
    (one scale per vocab row), as an untied `lm_head.weight` (a tied head rounded from the embedding table, which
    stays unrounded): the checkpoint's config must then say tie_word_embeddings false."""
    def rounded(w: torch.Tensor) -> torch.Tensor:
        rows = w.float().reshape(-1, w.shape[-1])  # one output channel per row (experts: expert-major)
        scales = (rows.abs().max(dim=1).values / 127.0).clamp(min=EPS)
        q = torch.quantize_per_channel(rows, scales.double(), torch.zeros(len(scales), dtype=torch.int64), 0,
                                       torch.qint8)
        return (q.int_repr().float() * scales[:, None]).reshape(w.shape)

    out = {name: rounded(w) if is_quantized_name(name, plan) else w.float() for name, w in state.items()}
    if lm_head:
        out[LM_HEAD] = rounded(head_weight(state))
    return out
