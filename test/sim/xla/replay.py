"""Trace an NxDI causal LM through NxD's ModelBuilder HLO stage, then replay the graphs on PJRT CPU through NxDI's
host code, as a Neuron device runs the compiled NEFFs.

- `trace_model`: the HLO stage of `ModelBuilder.trace` (mock_distributed, initialize_model_parallel, aot mode,
  `_generate_hlo` over every submodel and bucket, KV cache as `input_output_aliases`), with our `generate_hlo`
  installed as torch-neuronx's (see lower.py).
- `Graph`: one traced graph executed as compiled: real inputs, the weights of NxD's sharded checkpoint (rank 0),
  and the state (KV cache) carried from call to call through the aliased outputs. Traced ONCE with NxDI's example
  inputs, so anything value-dependent the trace baked in shows up as wrong logits.
- `Router`: stands where NxD's traced ScriptModule sits in `ModelWrapper.model` (it is a ScriptModule, so NxDI's
  `is_neuron()` holds without touching NxDI), picks the bucket graph by input shapes, returns the outputs that are
  not aliased state (the logits; NxDI's fused speculation: its list of tokens and next inputs).
- `greedy`: decoding through `NeuronBaseForCausalLM.forward` with the inputs `nxdi_gemma.neuron.runtime.greedy` and
  vllm-neuron pass.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .lower import HloGraph


def parallel_stage(builder):
    """The distributed setup ModelBuilder.trace and shard_checkpoint use, as a context manager."""
    import contextlib

    from neuronx_distributed.parallel_layers import parallel_state
    from neuronx_distributed.trace.mock_torchdist import mock_distributed

    @contextlib.contextmanager
    def stage():
        with mock_distributed(world_size=builder.world_size):
            torch.distributed.init_process_group("xla", rank=0, world_size=builder.world_size)
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=builder.tp_degree, pipeline_model_parallel_size=builder.pp_degree,
                expert_model_parallel_size=builder.ep_degree, skip_collective_init=True,
                lnc_size=builder.logical_nc_config)
            parallel_state.set_aot_mode(True)
            # NxD never destroys the draft group of fused speculation (initialize_speculative_draft_group keeps the
            # first size a process asked for, and NxD's shard_checkpoint leaves it set): each job of `python -m xla
            # --jobs` is its own ModelBuilder run, as each compile is its own process on Neuron, so a TP 2 job may
            # follow a TP 1 one.
            for name in ("_SPECULATIVE_DRAFT_GROUP", "_SPECULATIVE_DRAFT_GROUP_SPMD", "_SPECULATIVE_DRAFT_GROUP_SIZE"):
                setattr(parallel_state, name, None)
            if builder.init_custom_process_group_fn:
                builder.init_custom_process_group_fn()
            try:
                yield
            finally:
                parallel_state.set_aot_mode(False)
                parallel_state.destroy_model_parallel()
                torch.distributed.destroy_process_group()

    return stage()


def builder_of(model):
    """NxDI's own ModelBuilder for the model (every submodel, bucket and example input), working in a private
    folder: ModelBuilder's default /tmp/nxd_model/ would be shared by every process on the machine."""
    os.environ.setdefault("BASE_COMPILE_WORK_DIR", tempfile.mkdtemp(prefix="nxdi_gemma_sim_"))
    return model.get_builder()


def trace_model(model, tags: list[str] | None = None) -> dict[str, list[HloGraph]]:
    """Submodel tag -> one HloGraph per bucket, in bucket order; `tags`: only submodels whose tag contains one."""
    builder = builder_of(model)
    graphs = {}
    with parallel_stage(builder):
        for key in builder.model_collection:
            if not tags or any(t in key for t in tags):
                graphs[key] = builder._generate_hlo(key)
    return graphs


def sharded_weights(model) -> dict[str, torch.Tensor]:
    """Rank 0 of NxD's own checkpoint preprocessing and sharding (what a Neuron rank loads)."""
    return builder_of(model).shard_checkpoint()[0]


def _zeros(meta: tuple[tuple[int, ...], torch.dtype]) -> torch.Tensor:
    return torch.zeros(meta[0], dtype=meta[1])


class Graph:
    """One traced graph, run as compiled on the XLA device."""

    def __init__(self, name: str, hlo: HloGraph, weights: dict[str, torch.Tensor] | None):
        import torch_xla
        import torch_xla.core.xla_builder as xb

        self.name, self.hlo = name, hlo
        self.device = torch_xla.device()
        self.computation = xb.computation_from_module_proto(name, hlo.hlo_module)
        self.fixed: dict[int, torch.Tensor] = {}
        self.weight_problems: list[str] = []
        for wname, pid in hlo.weights.items():
            shape, dtype = hlo.params[pid]
            if weights is None:  # compile only: any values of the right shapes (empty: no zero-filling pass)
                value = torch.empty(shape, dtype=dtype)
            elif wname not in weights:
                self.weight_problems.append(f"{wname}: not in the sharded checkpoint")
                value = torch.zeros(shape, dtype=dtype)
            else:
                value = weights[wname]
                if (tuple(value.shape), value.dtype) != (shape, dtype):
                    self.weight_problems.append(f"{wname}: checkpoint {tuple(value.shape)} {value.dtype}, "
                                                f"graph {shape} {dtype}")
            self.fixed[pid] = value.to(self.device)
        for pid, value in hlo.constants.items():
            self.fixed[pid] = value.to(self.device)

    def takes(self, args) -> bool:
        return [tuple(a.shape) for a in args[: len(self.hlo.example_shapes)]] == self.hlo.example_shapes[: len(args)]

    def zero_state(self) -> dict[str, torch.Tensor]:
        return {name: _zeros(self.hlo.params[pid]).to(self.device)
                for pid, name in self.hlo.states.values() if pid >= 0}

    def example_args(self) -> list[torch.Tensor]:
        return [_zeros(self.hlo.params[pid]) if pid >= 0 else torch.zeros(shape)
                for pid, shape in zip(self.hlo.user_inputs, self.hlo.example_shapes, strict=True)]

    def launch(self, args, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Queue one execution (lazily): outputs are XLA tensors, nothing is compiled or run yet."""
        import torch_xla

        params: list[torch.Tensor | None] = [None] * self.hlo.num_params
        for pos, pid in enumerate(self.hlo.user_inputs):
            if pid < 0:
                continue
            arg = args[pos]
            if (tuple(arg.shape), arg.dtype) != self.hlo.params[pid]:
                raise RuntimeError(f"{self.name}: input {pos} is {tuple(arg.shape)} {arg.dtype}, traced as "
                                   f"{self.hlo.params[pid]}")
            params[pid] = arg.to(self.device)
        for pid, name in self.hlo.states.values():
            if pid >= 0:
                params[pid] = state[name]
        for pid, value in self.fixed.items():
            params[pid] = value
        missing = [pid for pid, p in enumerate(params) if p is None]
        if missing:
            raise RuntimeError(f"{self.name}: HLO parameters {missing} have no value")
        return list(torch_xla._XLAC._xla_user_computation(f"xla::{self.name}", params, self.computation))

    def __call__(self, args, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run once; the aliased outputs become the next call's state (the device updates them in place)."""
        import torch_xla

        outs = self.launch(args, state)
        for out_idx, (pid, name) in self.hlo.states.items():
            if pid >= 0:
                state[name] = outs[out_idx]
        torch_xla.sync()
        return outs

    def compile_only(self) -> dict[int, int]:
        """Have XLA compile this graph (with zero inputs) without executing it. Returns, for each aliased state,
        its parameter number in the module XLA compiled -> its bytes (torch-xla wraps our graph in a module of its
        own whose parameters it orders itself; a LoweringContext over the same outputs numbers them the same way,
        and `stats.bytes_accessed` checks the shapes)."""
        import torch_xla

        state = self.zero_state()
        outs = self.launch(self.example_args(), state)
        ctx = torch_xla._XLAC.lowering.LoweringContext("numbering")
        ctx.build(outs)
        numbers = {ctx.tensor_parameter_id(t): t.numel() * t.element_size() for t in state.values()}
        torch_xla._XLAC._xla_warm_up_cache(outs, [])
        return {n: b for n, b in numbers.items() if n >= 0}


class Router(torch.jit.ScriptModule):
    """In ModelWrapper.model's place: NxDI sees a ScriptModule (a Neuron model) and gets the non-state outputs."""

    def __init__(self, tag: str, graphs: list[Graph], session: Session):
        super().__init__()
        self.tag, self.graphs, self.session = tag, graphs, session

    def forward(self, *args):
        graph = next((g for g in self.graphs if g.takes(args)), None)
        if graph is None:
            raise RuntimeError(f"{self.tag}: no traced bucket takes inputs {[tuple(a.shape) for a in args]}")
        self.session.calls[graph.name] += 1
        if self.tag in self.session.observers:
            self.session.observers[self.tag](args)
        before, t0 = xla_compiles(), time.perf_counter()
        outs = graph(args, self.session.state)
        if xla_compiles() > before:  # a graph compiles on its first call only; more is a retrace
            self.session.compiled_at.append(f"{graph.name} call {self.session.calls[graph.name]}: "
                                            f"{xla_compiles() - before}")
            self.session.compile_seconds[graph.name] += time.perf_counter() - t0
        # What NxD's traced model returns: the outputs that are not aliased state, one tensor (logits or tokens) or,
        # for NxDI's fused speculation, a list (tokens, next input ids, next attention mask, next positions).
        returned = [o.cpu() for i, o in enumerate(outs) if i not in graph.hlo.states]
        return returned[0] if len(returned) == 1 else returned


@dataclass
class Session:
    """The replayed model: graphs per submodel, the shared KV state, call counts per graph."""

    graphs: dict[str, list[Graph]]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    compiled_at: list[str] = field(default_factory=list)  # "graph call n: compiles" for every call that compiled
    compile_seconds: Counter = field(default_factory=Counter)  # graph -> seconds of its calls that compiled
    observers: dict = field(default_factory=dict)  # submodel tag -> callable(inputs) run on each of its calls

    @property
    def weight_problems(self) -> dict[str, list[str]]:
        return {g.name: g.weight_problems for gs in self.graphs.values() for g in gs if g.weight_problems}


def attach(model, traced: dict[str, list[HloGraph]], weights: dict[str, torch.Tensor]) -> Session:
    """Put the replayed graphs where NxDI expects its loaded Neuron models; one KV state shared by CTE and TKG (on
    Neuron both submodels alias the same device buffers)."""
    session = Session({tag: [Graph(f"{tag}_bk{b}", h, weights) for b, h in enumerate(hs)]
                       for tag, hs in traced.items()})
    for graphs in session.graphs.values():
        for g in graphs:
            for name, value in g.zero_state().items():
                session.state.setdefault(name, value)
    for wrapper in model.models:
        wrapper.model = Router(wrapper.tag, session.graphs[wrapper.tag], session)
    return session


@torch.no_grad()  # not inference_mode: NxD's autograd Functions bump version counters
def greedy(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through NxDI's host code, with the inputs runtime.greedy and vllm-neuron pass: prefill at
    positions 0..S-1, then one token per step with a mask over the cached tokens (NxDI adds the active one).
    Returns tokens [B, N] and the logits that chose them [B, N, V]."""
    model.reset()
    batch, prompt = input_ids.shape
    ids, positions, mask = input_ids, torch.arange(prompt)[None].repeat(batch, 1), torch.ones_like(input_ids)
    tokens, logits = [], []
    for step in range(new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, seq_ids=torch.arange(batch))
        last = out.logits[:, -1].float()
        logits.append(last)
        tokens.append(last.argmax(-1))
        ids = tokens[-1][:, None]
        positions = torch.full((batch, 1), prompt + step)
        mask = torch.ones(batch, prompt + step, dtype=torch.long)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def xla_compiles() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0
