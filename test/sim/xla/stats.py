"""Figures of a traced graph: from the HLO text we hand to the compiler (what neuronx-cc would receive) and, after
a compile-only run, from XLA:CPU's own dump (optimized HLO and buffer assignment).

Per traced graph (`hlo_stats`): instruction and op counts, float64 anywhere, int64 values with two sequence-length
dimensions (an S x S index tensor, e.g. a band mask built from arange), the largest values, dot FLOPs,
collectives, parameter bytes by kind (input / state / weight / constant).

Per compiled graph (`xla_dump_stats`): XLA's buffer assignment (the temp arena = the peak of all intermediates as
XLA's heap simulator laid them out; the largest temp values) and an HloCostAnalysis-style bytes-accessed estimate
over the optimized entry computation.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .lower import HloGraph

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# float8 types (an fp8 KV cache, fp8 weights) are spelled f8e4m3fn, f8e5m2, ... in HLO text
_ARRAY = re.compile(r"\b(pred|[suf]\d+(?:e\d+m\d+(?:b11)?(?:fnuz|fn)?)?|bf16|c64|c128)\[([\d,]*)\]")
# name = shape opcode(operands), attributes   (shape may be a tuple)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([a-z][\w\-]*)\((.*)$")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "all-reduce-start", "all-gather-start", "collective-permute-start")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in a (possibly tuple) HLO shape."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        n = 1 if dtype.startswith("f8") else _BYTES.get(dtype, 4)
        for d in _dims(dims):
            n *= d
        total += n
    return total


def element_type(shape_text: str) -> str:
    """An instruction's element type: its array's (f32, s32, pred, ...), or `tuple` for a tuple shape."""
    if shape_text.startswith("("):
        return "tuple"
    m = _ARRAY.match(shape_text)
    return m.group(1) if m else shape_text


def _instructions(text: str):
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            yield m.groups()


def hlo_stats(graph: HloGraph, seq_lens: set[int]) -> dict:
    """Statistics of one traced graph. `seq_lens`: the sequence lengths of the graph (bucket, cache length), for
    spotting int64 values with two such dimensions."""
    ops, f64, s64_seq_seq, values, collectives = Counter(), [], [], [], Counter()
    op_types: Counter = Counter()
    flops = 0
    for _name, shape, opcode, rest in _instructions(graph.hlo_text):
        ops[opcode] += 1
        op_types[f"{opcode} {element_type(shape)}"] += 1
        if "f64[" in shape or re.search(r"\bf64\[", rest):
            f64.append(f"{opcode} {shape}")
        for dtype, dims in _ARRAY.findall(shape):
            if dtype == "s64" and sum(d in seq_lens and d > 1 for d in _dims(dims)) >= 2:
                s64_seq_seq.append(f"{opcode} {dtype}[{dims}]")
        if opcode not in ("parameter", "tuple", "get-tuple-element"):
            values.append((array_bytes(shape), f"{opcode} {shape[:80]}"))
        if opcode in COLLECTIVES:
            groups = re.search(r"replica_groups=(\{[^=]*?\}\})", rest)
            collectives[f"{opcode} {shape[:48]} groups={groups.group(1) if groups else '?'}"] += 1
        if opcode in ("dot", "convolution"):
            out = _ARRAY.findall(shape)
            operands = _ARRAY.findall(rest)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
            if out and operands:
                n = 1
                for d in _dims(out[0][1]):
                    n *= d
                lhs = _dims(operands[0][1])
                for axis in _dims(contracting.group(1)) if contracting else []:
                    n *= lhs[axis]
                flops += 2 * n
    values.sort(reverse=True)
    kinds = graph.kind_of()
    param_bytes: Counter = Counter()
    for pid in graph.params:
        param_bytes[kinds[pid]] += graph.nbytes(pid)
    return {
        "instructions": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "op_types": dict(sorted(op_types.items())),
        "f64": f64,
        "s64_seq_by_seq": s64_seq_seq,
        "largest_values": [f"{b / 2**20:.2f} MiB {what}" for b, what in values[:5]],
        # what the >= 1 MiB intermediates are (e.g. a dequantized weight would be a large multiply)
        "large_values_by_op": dict(Counter(what.split()[0] for b, what in values if b >= 2**20)),
        "largest_value_bytes": values[0][0] if values else 0,
        "dot_flops": flops,
        "collectives": dict(collectives),
        "param_bytes": dict(param_bytes),
        "trace_host_syncs": graph.trace_host_syncs,
        "alias_problems": graph.alias_problems,
        "states": {str(out): [pid, name] for out, (pid, name) in sorted(graph.states.items())},
        # the KV cache as built: state-dict name -> shape of each aliased state parameter
        "state_shapes": {name: list(graph.params[pid][0]) for _, (pid, name) in sorted(graph.states.items())
                         if pid >= 0},
    }


# ------------------------------------------------------------------------------------------------- XLA dump


def buffer_assignment(text: str) -> dict:
    """XLA's memory plan: the preallocated temp arena (peak of intermediates) and its largest values."""
    temp, params, live_out, biggest = 0, 0, 0, []
    for m in re.finditer(r"^allocation (\d+): size (\d+), ([^\n]*)\n((?: value:[^\n]*\n)*)", text, re.M):
        size, kind, body = int(m.group(2)), m.group(3), m.group(4)
        if "preallocated-temp" in kind:
            temp += size
            for name, vsize, shape in re.findall(r"value: <\d+ ([\w.\-{}]+) @\d+> \(size=(\d+),offset=\d+\): (\S+)",
                                                 body):
                biggest.append((int(vsize), f"{name} {shape}"))
        elif "parameter" in kind:
            params += size
        elif "maybe-live-out" in kind or "output" in kind:
            live_out += size
    biggest.sort(reverse=True)
    return {"temp_arena_bytes": temp, "parameter_bytes": params, "live_out_bytes": live_out,
            "largest_temp_values": [f"{b / 2**20:.2f} MiB {v}" for b, v in biggest[:5]]}


def _computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (the ENTRY computation under the key 'ENTRY')."""
    comps, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = "ENTRY" if head.group(1) else head.group(2)
            comps[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps


_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id",
         "replica-id", "iota"}


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction (the text after `opcode(`), without its attributes."""
    return re.findall(r"%([\w.\-]+)", rest.split("),")[0] if ")," in rest else rest)


def _resolve(comps: dict[str, list[str]], name: str, depth: int = 0) -> tuple[str, int | None]:
    """What a called computation does at its root, seen through XLA:CPU's `call` wrappers (parallel task
    partitions) and nested fusions: (root opcode, number of the computation's parameter that a root
    dynamic-update-slice / scatter / copy updates or copies, else None)."""
    params, root = {}, None
    for line in comps.get(name, []):
        m = _INSTR.match(line)
        if not m:
            continue
        iname, _shape, opcode, rest = m.groups()
        if opcode == "parameter":
            params[iname] = int(re.match(r"\s*(\d+)", rest).group(1))
        elif opcode in ("bitcast", "copy") and _operands(rest) and _operands(rest)[0] in params:
            params[iname] = params[_operands(rest)[0]]  # a view, or the copy a non-donating compile adds
        if line.lstrip().startswith("ROOT"):
            root = (opcode, _operands(rest), rest)
    if root is None or depth > 8:
        return "fusion", None
    opcode, operands, rest = root
    if opcode in ("fusion", "call"):
        called = re.search(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
        if not called:
            return opcode, None
        kind, inner = _resolve(comps, called.group(1), depth + 1)
        target = operands[inner] if inner is not None and inner < len(operands) else None
        return kind, params.get(target)
    if opcode in ("dynamic-update-slice", "scatter", "copy") and operands:
        return opcode, params.get(operands[0])
    return opcode, None


_SLICING = ("gather", "dynamic-slice", "slice")


def _param_reads(comps: dict[str, list[str]], name: str, depth: int = 0) -> dict[int, int]:
    """Bytes a called computation reads of each parameter it only slices or gathers from (as HloCostAnalysis counts
    a gather: the rows it fetches, not its whole operand), through nested fusions and calls. Parameters read any
    other way are absent (read whole). This is what makes a routed-expert gather cost the top-k experts' weights."""
    instrs, alias = [], {}
    for line in comps.get(name, []):
        m = _INSTR.match(line)
        if not m:
            continue
        iname, shape, opcode, rest = m.groups()
        ops = _operands(rest)
        if opcode == "parameter":
            alias[iname] = int(re.match(r"\s*(\d+)", rest).group(1))
        elif opcode == "bitcast" and ops and ops[0] in alias:
            alias[iname] = alias[ops[0]]
        else:
            instrs.append((shape, opcode, ops, rest))
    reads: dict[int, int] = {}
    whole: set[int] = set()
    for shape, opcode, ops, rest in instrs:
        nested = None
        if opcode in ("fusion", "call") and depth < 8:
            called = re.search(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
            nested = _param_reads(comps, called.group(1), depth + 1) if called else {}
        for k, operand in enumerate(ops):
            if operand not in alias:
                continue
            p = alias[operand]
            if opcode in _SLICING and k == 0:
                reads[p] = reads.get(p, 0) + array_bytes(shape)
            elif nested is not None and k in nested:
                reads[p] = reads.get(p, 0) + nested[k]
            elif not (opcode in _SLICING and k > 0):  # indices of a gather are small: count them whole
                whole.add(p)
    return {p: b for p, b in reads.items() if p not in whole}


def bytes_accessed(optimized_hlo: str, state_params: dict[int, int]) -> dict:
    """Memory traffic of one execution, estimated as XLA's HloCostAnalysis does over the ENTRY computation of the
    optimized module: every top-level instruction (fusion, dot, copy, XLA:CPU's parallel `call` wrappers, ...)
    reads its operands and writes its output once; reuse inside a fusion is free; an operand that is only gathered
    or sliced from counts the bytes fetched (`_param_reads`).

    In-place updates of aliased state: the graph's KV cache is an input aliased to an output, and the device writes
    that buffer in place. So a dynamic-update-slice or scatter (top level, or the root of a fusion or call) whose
    updated operand is such a parameter (directly or through a bitcast/copy) counts only the bytes it updates: its
    other operands (update, indices) read once and as many bytes as the largest of them written, as HloCostAnalysis
    itself counts dynamic-update-slice; and a copy of such a parameter counts nothing, since XLA:CPU makes it only
    because our compile-only run does not donate the buffer. Reads of the state by anything else (attention reading
    the cache) count in full. `state_params`: ENTRY parameter number -> bytes, of every aliased state.
    """
    comps = _computations(optimized_hlo)
    size, origin, found = {}, {}, set()
    total, by_op = 0, Counter()
    for line in comps.get("ENTRY", []):
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        size[name] = array_bytes(shape)
        operands = _operands(rest)
        if opcode == "parameter":
            number = int(re.match(r"\s*(\d+)", rest).group(1))
            if number in state_params:
                if size[name] != state_params[number]:
                    raise RuntimeError(f"parameter {number} of the compiled module is {shape}, not the aliased state "
                                       f"of {state_params[number]} bytes: parameter numbering differs")
                origin[name] = name
                found.add(number)
            continue
        kind, target = opcode, (0 if opcode in ("dynamic-update-slice", "scatter", "copy", "bitcast") else None)
        if opcode in ("fusion", "call"):
            called = re.search(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
            kind, target = _resolve(comps, called.group(1)) if called else (opcode, None)
        state_operand = target is not None and target < len(operands) and operands[target] in origin
        if kind in ("bitcast", "copy") and state_operand:
            origin[name] = origin[operands[target]]
            continue  # a view, or a copy only a non-donating compile makes (see above)
        if opcode in _FREE:
            continue
        if kind in ("dynamic-update-slice", "scatter") and state_operand:
            others = [size.get(o, 0) for i, o in enumerate(operands) if i != target]
            b = sum(others) + max(others, default=0)
            by_op[f"{kind} (in place)"] += b
            total += b
            origin[name] = origin[operands[target]]
            continue
        partial = {}
        if opcode in ("fusion", "call"):
            called = re.search(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
            partial = _param_reads(comps, called.group(1)) if called else {}
        elif opcode in _SLICING:
            partial = {0: size[name]}
        b = size[name] + sum(min(partial.get(k, size.get(o, 0)), size.get(o, 0)) for k, o in enumerate(operands))
        total += b
        by_op[opcode] += b
    if found != set(state_params):
        raise RuntimeError(f"aliased state parameters {sorted(set(state_params) - found)} not in the compiled module")
    return {"bytes_accessed": total, "by_op": dict(by_op.most_common(8))}


def xla_dump_stats(files: list[Path], state_params: dict[int, int]) -> dict:
    """Summarize the files XLA dumped while compiling one graph."""
    out: dict = {}
    ba = [f for f in files if f.name.endswith("buffer-assignment.txt")]
    opt = [f for f in files if f.name.endswith("after_optimizations.txt")]
    if ba:
        out.update(buffer_assignment(max(ba, key=lambda f: f.stat().st_size).read_text()))
    if opt:
        text = max(opt, key=lambda f: f.stat().st_size).read_text()
        out.update(bytes_accessed(text, state_params))
        out["optimized_instructions"] = sum(1 for _ in _instructions(text))
        out["optimized_f64"] = text.count("f64[")
    return out
