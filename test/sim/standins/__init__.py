"""Import stand-ins for the closed-source Neuron packages, so NxD and NxDI source trees load without the SDK.

NxD and NxDI import torch-neuronx, neuronx-cc (and its NKI), libneuronxla, nki, nkilib and `torch.classes.neuron.*`
at module load, although NxDI's CPU mode (`NeuronConfig(on_cpu=True)`, `model.to_cpu()`) and NxD's HLO stage never
need them on a forward pass. Every module under those names is made up on import; every attribute of it is an inert
stand-in that can be subclassed, subscripted, used as a decorator or context manager, and that RECORDS each call.
A test asserts that `calls()` did not grow while a model generated: otherwise its numbers would depend on
closed-source behaviour we did not model.

Modes (`NXDI_GEMMA_SIM_MODE`, or `install(mode)`):
- `cpu`: NxDI CPU mode. `torch_xla` is stood in as well (NxD imports it at module load; CPU mode never runs it).
- `xla`: real torch-xla on PJRT CPU. torch_xla is NOT stood in; `libneuronxla.libneuronpjrt_path` and
  `torch_neuronx.xla` are withheld (ImportError) so torch-xla's Neuron probe fails and it stays on PJRT CPU;
  `PJRT_DEVICE` defaults to `CPU`. Install before torch_xla is imported (the sitecustomize does).

API (import as `standins`; `sitecustomize.py` in this folder installs it in every process, torchrun workers included,
whose `PYTHONPATH` has this folder):
- `install(mode=None)`: idempotent; mode defaults to `$NXDI_GEMMA_SIM_MODE`, else `cpu`. `mode()` returns it.
- `provide(module, name, obj)`: a real implementation for one stood-in name, e.g.
  `standins.provide("torch_neuronx.xla_impl.trace", "generate_hlo", fn)`. Plain functions are wrapped so their
  calls are recorded too; classes and other objects are served as they are. Call it before the code that does
  `from module import name` is imported (an already imported module gets the new attribute as well, but names
  copied out of it earlier keep the inert stand-in).
- `calls()`: every stand-in call so far, in order, as qualified names; `mark()` then `calls(since=m)` gives the
  calls after a point. `accessed()`: the stood-in module and attribute names that were touched (for reports).
- `STOOD_IN`: the top-level package names stood in for the current mode.

Real values (not inert) are provided by default only where NxDI compares the result at import or config time:
`torch_neuronx.utils.get_platform_target` (`$NXDI_GEMMA_SIM_PLATFORM`, default `trn1`) and package `__version__`s.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import types
from collections.abc import Callable
from typing import Any

CLOSED = ("torch_neuronx", "neuronxcc", "libneuronxla", "nki", "nkilib")
# The SDK 2.28 versions; NxD parses some of them (e.g. torch_neuronx's) at import.
VERSIONS = {"torch_neuronx": "2.9.0.2.12", "neuronxcc": "2.23.0", "libneuronxla": "2.2.0", "nki": "0.2.0",
            "nkilib": "0.1.0", "torch_xla": "2.9.0"}  # fmt: skip
WITHHELD_XLA = ("libneuronxla.libneuronpjrt_path", "torch_neuronx.xla")

_CALLS: list[str] = []
_ACCESSED: set[str] = set()
_PROVIDED: dict[tuple[str, str], Any] = {}
_STATE: dict[str, str] = {}
STOOD_IN: tuple[str, ...] = ()


def calls(since: int = 0) -> list[str]:
    """Qualified names of the stand-ins called (from index `since`), in call order."""
    return list(_CALLS[since:])


def mark() -> int:
    """A position in the call record, for `calls(since=...)`."""
    return len(_CALLS)


def accessed() -> list[str]:
    return sorted(_ACCESSED)


def mode() -> str:
    return _STATE.get("mode", "")


# ---------------------------------------------------------------------------------------------------- inert names
class _Inert(type):
    """Metaclass of the inert stand-ins: each is a class, so NxD can subclass it, and its attributes are more of them."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        child = _inert(f"{cls.__qualname__}.{name}")
        type.__setattr__(cls, name, child)
        return child

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not cls.__dict__.get("_standin", False):
            return type.__call__(cls, *args, **kwargs)  # a project or NxD class deriving from a stand-in
        _CALLS.append(cls.__qualname__)
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _Inert):
            return args[0]  # used as a bare decorator (@nki.jit): the decorated function stays itself
        return _inert(f"{cls.__qualname__}()")

    def __getitem__(cls, item: Any) -> Any:  # type annotations such as nl.tile[...]
        return cls

    def __or__(cls, other: Any) -> Any:
        return cls

    __ror__ = __or__

    def __iter__(cls):
        return iter(())

    def __len__(cls) -> int:
        return 0

    def __bool__(cls) -> bool:
        return True

    def __enter__(cls) -> Any:
        return cls

    def __exit__(cls, *exc: Any) -> bool:
        return False

    def __repr__(cls) -> str:
        return f"<stand-in {cls.__qualname__}>"


def _inert(qualname: str) -> Any:
    _ACCESSED.add(qualname)
    return _Inert(qualname.rsplit(".", 1)[-1], (), {"_standin": True, "__qualname__": qualname,
                                                    "__module__": "standins"})


def _recorded(qualname: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _CALLS.append(qualname)
        return fn(*args, **kwargs)

    return wrapper


def _served(module: str, name: str, obj: Any) -> Any:
    return _recorded(f"{module}.{name}", obj) if inspect.isfunction(obj) or inspect.isbuiltin(obj) else obj


class _StoodInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        key = (self.__name__, name)
        if key in _PROVIDED:
            value = _served(self.__name__, name, _PROVIDED[key])
            _ACCESSED.add(f"{self.__name__}.{name}")
        else:
            value = _inert(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in _STATE.get("withheld", ()):
            raise ModuleNotFoundError(f"{fullname} is withheld by the simulation stand-ins (keeps torch-xla on PJRT CPU)",
                                      name=fullname)
        if fullname.split(".")[0] in STOOD_IN:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StoodInModule(spec.name)
        module.__path__ = []
        module.__file__ = f"<stand-in {spec.name}>"
        module.__version__ = VERSIONS.get(spec.name.split(".")[0], "0.0.0")
        _ACCESSED.add(spec.name)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _TorchNeuronClasses(types.ModuleType):
    """`torch.classes.neuron`: the TorchScript classes torch-neuronx's C++ library registers (SPMDModel, ...)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _inert(f"torch.classes.neuron.{name}")
        setattr(self, name, value)
        return value


def provide(module: str, name: str, obj: Any) -> None:
    """Serve `obj` as `module.name` instead of the inert stand-in (see the module docstring)."""
    if module.split(".")[0] not in CLOSED + ("torch_xla",):
        raise ValueError(f"provide({module!r}, {name!r}): only names under {CLOSED} (and torch_xla) are stood in")
    _PROVIDED[(module, name)] = obj
    loaded = sys.modules.get(module)
    if isinstance(loaded, _StoodInModule):
        setattr(loaded, name, _served(module, name, obj))


def _platform_target(*_args: Any, **_kwargs: Any) -> str:
    return os.environ.get("NXDI_GEMMA_SIM_PLATFORM", "trn1")


def install(mode: str | None = None) -> None:
    """Put the stand-ins in front of every import (idempotent; a second call must name the same mode)."""
    global STOOD_IN
    mode = mode or os.environ.get("NXDI_GEMMA_SIM_MODE") or "cpu"
    if mode not in ("cpu", "xla"):
        raise ValueError(f"NXDI_GEMMA_SIM_MODE={mode!r}: use 'cpu' (NxDI CPU mode) or 'xla' (real torch-xla on PJRT CPU)")
    if _STATE.get("mode"):
        if _STATE["mode"] != mode:
            raise RuntimeError(f"stand-ins already installed in mode {_STATE['mode']!r}, cannot switch to {mode!r}")
        return
    if mode == "xla" and "torch_xla" in sys.modules:
        raise RuntimeError("xla mode: install the stand-ins before torch_xla is imported (it probes for Neuron once)")
    _STATE["mode"] = mode
    STOOD_IN = CLOSED + (("torch_xla",) if mode == "cpu" else ())
    if mode == "xla":
        _STATE["withheld"] = WITHHELD_XLA
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    for module in ("torch_neuronx.utils", "torch_neuronx.utils.utils"):
        _PROVIDED.setdefault((module, "get_platform_target"), _platform_target)
    sys.meta_path.insert(0, _Finder())
    import torch

    # torch.classes caches namespaces as attributes; pre-seeding "neuron" avoids the C++ lookup that would fail.
    torch.classes.neuron = _TorchNeuronClasses("torch.classes.neuron")
