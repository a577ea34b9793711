"""What a Neuron machine provides to real vLLM + real vllm-neuron, stood in for the simulation tier (test code only).

Active in every process of a run whose environment has NXDI_GEMMA_SIM_VLLM=1 (installed by vllm_site/sitecustomize.py,
after the closed-source package stand-ins of `standins`). Each takes effect right after its module is imported:

1. `vllm_neuron._is_neuron_dev` (a glob for /dev/neuron*) answers yes, so vLLM picks vllm-neuron's NeuronPlatform.
2. NxDI `NeuronApplicationBase.compile(path)` runs only its real first step, `self.config.save(path)` (the
   neuron_config.json that vllm-neuron's precompiled-load path reads back on the next start); tracing, neuronx-cc
   and weight sharding need the SDK.
3. NxDI `NeuronApplicationBase.load(path)` becomes NxDI's own CPU path `self.to_cpu()` (the checkpoint's weights
   loaded into the CPU-mode model) instead of loading NEFFs onto NeuronCores. With NxDI's dynamic multi-LoRA (what
   vllm-neuron 0.4.1 turns on whenever max_cpu_loras > 0), it then does what NxDI's device `load()` does for it
   (application_base.py 0.8, "Sharding CPU LoRA adapter weights on load": `update_weights_for_lora_cpu`,
   `shard_cpu_checkpoints`, `init_dynamic_multi_lora`), and stands in for the device weight set that
   `dynamic_update_weights_for_lora` swaps adapters into (`context_encoding_model.model.nxd_model.weights`, one dict
   per rank of the loaded weights by name): the CPU model's own tensors, so a swap writes the CPU model's LoRA slots.
   On device both submodels read that one weight set; NxDI's CPU mode builds one model per submodel under
   continuous batching, so the token-generation model's LoRA weights are tied to the context-encoding model's, and
   the context-encoding model's LoRA modules get `is_context_encoding = True`, which NxDI sets on the shared LoRA
   config while it makes each submodel's trace inputs (model_wrapper.py `input_generator`), a step CPU mode skips.
4. With prefix caching, NxDI's ModelWrapper in CPU mode selects a partial batch's output rows the way its Neuron
   path does (see `_model_wrapper`).
Everything else is the real code: vLLM, vllm-neuron (platform, scheduler, worker, runner, loader with its
compile-or-load logic), the project's plugin and NxDI classes. `EVENTS` records each stand-in use, and `MODELS` the
NxDI applications loaded in this process (for the driver's report).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

EVENTS: list[str] = []
MODELS: list[Any] = []


def _event(message: str) -> None:
    EVENTS.append(message)
    print(f"[sim vllm stand-in, pid {os.getpid()}] {message}", file=sys.stderr, flush=True)


def _neuron_device_probe(module: ModuleType) -> None:
    def _is_neuron_dev() -> bool:
        _event("vllm_neuron._is_neuron_dev -> True")
        return True

    module._is_neuron_dev = _is_neuron_dev


def _application_base(module: ModuleType) -> None:
    base = module.NeuronApplicationBase

    def compile(self: Any, compiled_model_path: str, *args: Any, **kwargs: Any) -> None:
        self.config.save(compiled_model_path)
        _event(f"{type(self).__name__}.compile({compiled_model_path}): saved neuron_config.json only")

    def load(self: Any, compiled_model_path: str, *args: Any, **kwargs: Any) -> None:
        _event(f"{type(self).__name__}.load({compiled_model_path}): to_cpu()")
        # NxDI's to_cpu() refuses speculation_length > 0 (CPU mode never ran speculation, 0.8 and 0.9); under
        # continuous batching (vllm-neuron's) it builds every submodel from its wrapper's own config copy, which
        # keeps it: lowered on the application's config around to_cpu only (as test/sim/spec_driver.py does).
        spec = self.config.neuron_config.speculation_length
        if spec and not self.config.neuron_config.is_continuous_batching:
            raise RuntimeError("speculation in CPU mode needs continuous batching (see vllm_standins.load)")
        self.config.neuron_config.speculation_length = 0
        try:
            self.to_cpu()
        finally:
            self.config.neuron_config.speculation_length = spec
        lora = self.neuron_config.lora_config
        if lora is not None and lora.dynamic_multi_lora:
            _dynamic_lora_on_cpu(self)
        MODELS.append(self)

    base.compile, base.load = compile, load


def _model_wrapper(module: ModuleType) -> None:
    """Prefix caching only: on Neuron, NxDI's ModelWrapper (0.8 and 0.9) pads a partial batch with the missing seq
    ids after the given ones (unsorted) and returns the padded output's first rows; in CPU mode it instead
    index-selects rows by the given seq ids, which picks padding rows unless they are 0 .. n-1. This stands in for
    the Neuron slice in CPU mode: the model runs with the real seq ids (LoRA serving keys each sequence's active
    adapter weights by seq id), and the first rows of its output are returned."""
    wrapper = module.ModelWrapper
    original = wrapper._forward_with_pad

    def _forward_with_pad(self: Any, *args: Any) -> Any:
        if not (self.neuron_config.is_prefix_caching and not self.is_neuron()):
            return original(self, *args)
        rows = args[3].shape[0]
        run = self._forward
        seen: list[Any] = []

        def forward(*padded: Any) -> Any:
            outputs = run(*padded)
            seen.append(outputs[0])
            return outputs

        self._forward = forward
        try:
            _, *rest = original(self, *args)
        finally:
            del self._forward  # the class's method again
        return [seen[-1][:rows], *rest]

    wrapper._forward_with_pad = _forward_with_pad


def _dynamic_lora_on_cpu(app: Any) -> None:
    """See 3. in the module docstring."""
    from types import SimpleNamespace

    cte = app.context_encoding_model.model
    tkg = app.token_generation_model.model
    if tkg is not cte:
        from neuronx_distributed_inference.modules.lora_serving import is_lora_module

        for module in cte.modules():
            if is_lora_module(module):
                module.is_context_encoding = True
        weights = dict(cte.named_parameters())
        for name, _ in list(tkg.named_parameters()):
            if ".lora_A." in f"{name}." or ".lora_B." in f"{name}.":
                module_name, _, attr = name.rpartition(".")
                setattr(tkg.get_submodule(module_name), attr, weights[name])
    checkpoint = cte.lora_weight_manager.lora_checkpoint
    checkpoint.update_weights_for_lora_cpu(cte)
    cpu_weights = checkpoint.shard_cpu_checkpoints(0, 1, app.neuron_config.tp_degree, cte)
    app.lora_model_manager.init_dynamic_multi_lora(cpu_weights)
    cte.nxd_model = SimpleNamespace(weights=[{name: p.data for name, p in cte.named_parameters()}])
    _event(f"{type(app).__name__}: dynamic multi-LoRA on the CPU model's weights")


HOOKS: dict[str, Callable[[ModuleType], None]] = {
    "vllm_neuron": _neuron_device_probe,
    "neuronx_distributed_inference.models.application_base": _application_base,
    "neuronx_distributed_inference.models.model_wrapper": _model_wrapper,
}


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, hook: Callable[[ModuleType], None]) -> None:
        self.inner, self.hook = inner, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.hook(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds the hooked modules through the other finders and runs the hook after the module body."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        hook = HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HookedLoader(spec.loader, hook)
                return spec
        return None


def install() -> None:
    """Idempotent. Must run before vllm_neuron and NxDI are imported (modules already loaded are not hooked)."""
    already = [name for name in HOOKS if name in sys.modules]
    if already:
        raise RuntimeError(f"vllm_standins.install(): {already} imported before the stand-ins; install them first")
    if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
