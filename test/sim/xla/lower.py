"""Our `torch_neuronx.xla_impl.trace.generate_hlo` on public torch-xla 2.9 APIs, and the HLO `xla_hlo_call` subset
NxDI's KV cache uses (fill_prefix, dynamic_update_slice).

`generate_hlo` is what NxD's `ModelBuilder._generate_hlo` calls for every submodel and bucket: the module and NxDI's
example inputs move to the XLA device, forward runs lazily, and the outputs are lowered with torch-xla's
`LoweringContext`. Every HLO parameter is then sorted into one of four kinds, which is what a NEFF needs to know:
user input (position in the example inputs), aliased state (the KV cache, given by `input_output_aliases`; its
shape and dtype must equal the output it aliases), weight (a state-dict name of the traced module), or constant
(anything else the trace captured, frozen at its trace-time value, as a compiled NEFF freezes it).
Host syncs and CPU fallbacks during the traced forward are counted: on Neuron a host read inside forward would be
baked into the graph as a constant.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

# torch-xla counters that mean the host read a device value (or ran an op on CPU) while the forward was traced.
_SYNC_COUNTERS = ("aten::_local_scalar_dense", "xla::_to_cpu", "TransferFromDeviceTime", "aten::nonzero",
                  "aten::masked_select", "aten::_unique2")


@dataclass
class HloGraph:
    """One traced graph (one submodel, one bucket). `hlo_module` is the serialized HloModuleProto (bytes)."""

    hlo_module: bytes
    hlo_text: str
    example_shapes: list[tuple[int, ...]]
    user_inputs: list[int]  # HLO parameter id per example input (-1: the graph never reads it)
    states: dict[int, tuple[int, str]]  # output index -> (parameter id or -1, state-dict name of the aliased tensor)
    weights: dict[str, int]  # state-dict name -> parameter id
    constants: dict[int, torch.Tensor]  # parameter id -> frozen trace-time value (CPU)
    params: dict[int, tuple[tuple[int, ...], torch.dtype]]  # every parameter's shape and dtype (values are not kept:
    # weights come from the sharded checkpoint, inputs and state from each call)
    output_meta: list[tuple[tuple[int, ...], torch.dtype]]
    trace_host_syncs: dict[str, int] = field(default_factory=dict)
    alias_problems: list[str] = field(default_factory=list)
    metaneff: object = None  # NxD serializes this; see _Metaneff

    @property
    def num_params(self) -> int:
        return len(self.params)

    def nbytes(self, pid: int) -> int:
        shape, dtype = self.params[pid]
        return math.prod(shape) * dtype.itemsize

    def kind_of(self) -> dict[int, str]:
        """Parameter id -> input | state | weight | constant."""
        kinds = dict.fromkeys(self.params, "constant")
        kinds.update({pid: "weight" for pid in self.weights.values()})
        kinds.update({pid: "state" for pid, _ in self.states.values() if pid >= 0})
        kinds.update({pid: "input" for pid in self.user_inputs if pid >= 0})
        return kinds


class _Metaneff:
    """NxD calls `hlo_artifacts.metaneff.SerializeToString()`; nothing reads it back in the simulation."""

    def __init__(self, graph: HloGraph):
        self.num_inputs, self.num_states = len(graph.user_inputs), len(graph.states)

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf method name)
        return f"inputs={self.num_inputs} states={self.num_states}".encode()


def counter_snapshot() -> dict[str, int]:
    import torch_xla.debug.metrics as met

    out = {name: met.counter_value(name) or 0 for name in met.counter_names()}
    for name in met.metric_names():
        data = met.metric_data(name)
        if data:
            out[name] = data[0]
    return out


def host_syncs(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that grew between two snapshots and mean a host read or a CPU fallback (any `aten::` counter is an
    op torch-xla could not lower)."""
    grown = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    return {k: v for k, v in grown.items() if k in _SYNC_COUNTERS or k.startswith("aten::")}


def _flatten(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    flat = []
    for item in outputs:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item] if isinstance(item, torch.Tensor) else [])
    return flat


def generate_hlo(func: torch.nn.Module, example_inputs, input_output_aliases: dict | None = None,
                 preserve_parameters: bool = False, **_neuron_options) -> HloGraph:
    """NxD's call signature (inline_weights_to_neff, return_weights, cpu_backend, ... only matter for a NEFF).
    Unless NxD asks to preserve the parameters (several buckets trace the same module), the module's device
    copies are dropped after lowering, as torch-neuronx drops them: ModelBuilder loads a fresh module for anything
    later, and a 32-expert geometry would otherwise hold every submodel's weights at once."""
    import torch_xla
    import torch_xla.core.xla_builder as xb

    aliases = input_output_aliases or {}
    names_by_id: dict[int, list[str]] = {}
    for name, p in func.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(p), []).append(name)
    state_names = {}
    for tensor, out_idx in aliases.items():
        if id(tensor) not in names_by_id:
            raise RuntimeError(f"generate_hlo: aliased tensor for output {out_idx} is not a parameter of the module")
        state_names[out_idx] = names_by_id[id(tensor)][0]

    device = torch_xla.device()
    torch_xla.sync()
    func.to(device)
    inputs = [t.to(device) for t in example_inputs]
    before = counter_snapshot()
    with torch.no_grad():
        outputs = _flatten(func(*inputs))
    syncs = host_syncs(before, counter_snapshot())

    ctx = torch_xla._XLAC.lowering.LoweringContext("nxdi_gemma_sim")
    ctx.build(outputs)
    proto = ctx.hlo()
    text = xb.get_computation_hlo(xb.computation_from_module_proto("nxdi_gemma_sim", proto))
    values = ctx.device_parameter_id_tensor_mapping()  # device tensors: no host copy of the weights

    user_inputs = [ctx.tensor_parameter_id(t) for t in inputs]
    named: dict[int, list[str]] = {}
    tensors = list(func.named_parameters(remove_duplicate=False)) + list(func.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        pid = ctx.tensor_parameter_id(t)
        if pid >= 0:
            named.setdefault(pid, []).append(name)
    pid_of_name = {n: pid for pid, ns in named.items() for n in ns}
    states = {out_idx: (pid_of_name.get(name, -1), name) for out_idx, name in state_names.items()}
    state_pids = {pid for pid, _ in states.values()}
    weights = {ns[0]: pid for pid, ns in named.items() if pid not in state_pids}
    taken = {p for p in user_inputs if p >= 0} | state_pids | set(weights.values())
    constants = {pid: v.cpu() for pid, v in values.items() if pid not in taken}
    params = {pid: (tuple(v.shape), v.dtype) for pid, v in values.items()}
    meta = [(tuple(t.shape), t.dtype) for t in outputs]

    problems = []
    for out_idx, (pid, name) in sorted(states.items()):
        if out_idx >= len(outputs):
            problems.append(f"state {name} aliases output {out_idx}, but the graph has {len(outputs)} outputs")
        elif pid < 0:
            problems.append(f"state {name} (output {out_idx}) is never read by the graph")
        elif params[pid] != meta[out_idx]:
            problems.append(f"output {out_idx} {meta[out_idx]} cannot alias {name} {params[pid]}")
    graph = HloGraph(hlo_module=proto, hlo_text=text, example_shapes=[tuple(t.shape) for t in example_inputs],
                     user_inputs=user_inputs, states=states, weights=weights, constants=constants,
                     params=params, output_meta=meta, trace_host_syncs=syncs, alias_problems=problems)
    graph.metaneff = _Metaneff(graph)
    del values, outputs, inputs
    # Lazy tensors the forward left in Python state (e.g. the model's ForwardState keeps the last K/V and per-layer
    # inputs) still hold this trace's IR: the next sync would compile and run them as one more graph. Drop it, as
    # torch-xla's own exporter (stablehlo.py) does after lowering.
    torch_xla._XLAC._clear_pending_irs(str(device))
    if not preserve_parameters:
        func.to_empty(device="meta")
    return graph


# ---------------------------------------------------------------------------------------------------- xla_hlo_call
# NxDI writes fill_prefix / dynamic_update_slice in torch-neuronx's HLO "scribe" DSL and wraps them with
# `xla_hlo_call`. We build the same HLO with torch_xla's XlaBuilder and splice it into the lazy graph as a user
# computation. Only the ops NxDI's KV cache uses exist; any other raises, naming the op.


class _Operand:
    def __init__(self, op, scribe: _Scribe):
        self.op, self.scribe = op, scribe
        shape = op.shape()
        self.sizes = tuple(shape.sizes)
        self.dtype = _Type(scribe, shape.dtype)


class _Type:
    def __init__(self, scribe: _Scribe, name: str):
        self.scribe, self.name = scribe, name

    def Constant(self, constant_value):  # noqa: N802 (scribe API)
        import torch_xla.core.xla_builder as xb

        return _Operand(xb.Op.scalar(self.scribe.builder, constant_value, dtype=self.name), self.scribe)

    def __getitem__(self, sizes) -> _Shaped:
        return _Shaped(self, tuple(sizes) if isinstance(sizes, (tuple, list)) else (sizes,))


class _Shaped:
    def __init__(self, dtype: _Type, sizes: tuple[int, ...]):
        self.dtype, self.sizes = dtype, sizes

    def _checked(self, op, scribe, what: str) -> _Operand:
        out = _Operand(op, scribe)
        if out.sizes != self.sizes or out.dtype.name != self.dtype.name:
            raise ValueError(f"xla_hlo_call {what}: declared {self.dtype.name}{list(self.sizes)}, "
                             f"built {out.dtype.name}{list(out.sizes)}")
        return out

    def DynamicUpdateSlice(self, operand, update, *starts):  # noqa: N802 (scribe API)
        return self._checked(operand.op.dynamic_update_slice(update.op, [s.op for s in starts]), operand.scribe,
                             "DynamicUpdateSlice")

    def DynamicSlice(self, operand, *starts):  # noqa: N802 (scribe API)
        return self._checked(operand.op.dynamic_slice([s.op for s in starts], list(self.sizes)), operand.scribe,
                             "DynamicSlice")

    def __getattr__(self, name):
        raise NotImplementedError(f"xla_hlo_call: scribe op {name!r} is not implemented by test/sim/xla/lower.py")


_TYPES = {"pred", "s8", "u8", "s16", "u16", "s32", "u32", "s64", "u64", "bf16", "f16", "f32", "f64", "f8e4m3fn",
          "f8e5m2"}
# An fp8 KV cache (`kv_cache_quant`) reaches fill_prefix / dynamic_update_slice as float8; torch-xla's builder has no
# torch -> XLA mapping for it, though XLA's shapes and DynamicUpdateSlice take the type.
_FLOAT8 = {torch.float8_e4m3fn: "f8e4m3fn", torch.float8_e5m2: "f8e5m2"}


def _xla_type(dtype: torch.dtype) -> str:
    import torch_xla.core.xla_builder as xb

    return _FLOAT8[dtype] if dtype in _FLOAT8 else xb.Op.from_torch_type(dtype)


class _Scribe:
    def __init__(self, builder):
        self.builder = builder

    def __getattr__(self, name):
        if name in _TYPES:
            return _Type(self, name)
        raise NotImplementedError(f"xla_hlo_call: scribe attribute {name!r} is not implemented by test/sim/xla/lower.py")


def xla_hlo_call(fn=None, **_options):
    """Decorator: fn receives one operand per tensor argument and returns the root operand."""
    if fn is None:
        return xla_hlo_call

    @functools.wraps(fn)
    def call(*tensors):
        import torch_xla
        import torch_xla.core.xla_builder as xb

        name = f"nxdi_{fn.__name__}"
        builder = xb.create_builder(name)
        scribe = _Scribe(builder)
        operands = []
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"xla_hlo_call({fn.__name__}): argument {i} is {type(t).__name__}, not a tensor")
            shape = xb.mkshape(_xla_type(t.dtype), list(t.shape))
            operands.append(_Operand(xb.mkparam(builder, i, shape), scribe))
        computation = fn(*operands).op.build(name)
        out = torch_xla._XLAC._xla_user_computation(f"xla::{name}", list(tensors), computation)
        return out[0] if len(out) == 1 else out

    return call
