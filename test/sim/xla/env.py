"""Set up a process for XLA tracing: the simulation's import stand-ins in `xla` mode (real torch-xla on PJRT CPU),
serving our `generate_hlo` and `xla_hlo_call` as torch-neuronx's. Must run before torch_xla, NxD or NxDI are
imported; `sitecustomize` in test/sim/standins installs the stand-ins in every process whose PYTHONPATH has that
folder, otherwise we load them from their file here.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

STANDINS_DIR = Path(__file__).resolve().parent.parent / "standins"


def standins() -> ModuleType:
    if "standins" not in sys.modules:
        spec = importlib.util.spec_from_file_location("standins", STANDINS_DIR / "__init__.py",
                                                      submodule_search_locations=[str(STANDINS_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["standins"] = module
        spec.loader.exec_module(module)
    return sys.modules["standins"]


def install(xla_dump: str | None = None, fast_compile: bool = False) -> ModuleType:
    """Stand-ins in xla mode with our tracer; `xla_dump`: a folder for XLA's dumps (optimized HLO, buffer
    assignment); `fast_compile`: XLA:CPU's backend (LLVM) optimization level 0, which halves the compile of a large
    graph (HLO passes and the graph's semantics unchanged; for replays whose run time is negligible). XLA reads
    XLA_FLAGS once, so both must be given before torch_xla is first used."""
    added = []
    if xla_dump:
        added += [f"--xla_dump_to={xla_dump}", "--xla_dump_hlo_as_text"]
    if fast_compile:
        added.append("--xla_backend_optimization_level=0")
    if added:
        if "torch_xla" in sys.modules:
            raise RuntimeError("XLA flags must be set before torch_xla is imported (XLA reads XLA_FLAGS once)")
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *added]).strip()
    module = standins()
    module.install("xla")
    from .lower import generate_hlo, xla_hlo_call

    module.provide("torch_neuronx.xla_impl.trace", "generate_hlo", generate_hlo)
    module.provide("torch_neuronx.xla_impl.ops", "xla_hlo_call", xla_hlo_call)
    # NxD's CustomRMSNorm (what NxDI's Llama, Qwen and Mixtral norms use on Neuron) is a custom call neuronx-cc
    # lowers itself; for tracing NxDI's own models (`python -m xla --nxdi`) it is plain torch here. Our classes
    # never call it.
    module.provide("torch_neuronx.xla_impl.ops", "RmsNorm", RmsNormStandIn)
    # NxD's distributed argmax (greedy verification of NxDI's fused speculation) ends in torch-neuronx's Argmax
    # custom op: torch.argmax here (an XLA reduce over value and index, first maximum).
    module.provide("torch_neuronx.xla_impl.ops", "Argmax", ArgmaxStandIn)
    # NxDI's layer-boundary markers (Qwen3-MoE's decoder layers) are identity custom calls, hints for neuronx-cc's
    # module flow, built with this decorator: identity here.
    module.provide("torch_neuronx.xla_impl.base", "xla_hlo_call", marker_hlo_call)
    return module


def marker_hlo_call(fn):
    """`torch_neuronx.xla_impl.base.xla_hlo_call` as NxDI uses it (only for layer_boundary_marker's identity
    custom calls): the decorated call returns its tensors unchanged."""

    def call(*tensors):
        return tensors[0] if len(tensors) == 1 else tensors

    return call


class RmsNormStandIn:
    """`torch_neuronx.xla_impl.ops.RmsNorm` as plain torch: x * rsqrt(mean(x^2) + eps) * w over `dim`."""

    @staticmethod
    def apply(x, weight, eps, dim):
        import torch

        return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps) * weight


class ArgmaxStandIn:
    """`torch_neuronx.xla_impl.ops.Argmax` as plain torch: torch.argmax(x, dim, keepdim)."""

    @staticmethod
    def apply(x, dim, keepdim=False):
        import torch

        return torch.argmax(x, dim=dim, keepdim=keepdim)
