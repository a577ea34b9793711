"""Memory and speed planning for a Gemma plan on a Neuron instance, per NeuronCore.

Counts (all per core, bytes):
- weights: every tensor / TP, except the small replicated ones (norms, router); NxDI keeps the tied LM head as a
  second copy of the embedding, so the vocab x H table counts twice.
- KV cache, as `neuron/kv_cache.py` builds it: per producer layer 2 x batch x cache_len x kv_heads_per_core x
  head_dim x dtype bytes, with cache_len = the window on sliding layers (a ring of W slots) and seq_len on full
  layers, plus one prefill chunk of spare slots when prompts longer than a chunk are prefilled in chunks (a chunk is
  written whole at its first position); KV-shared Gemma 4 layers own nothing. KV heads are replicated when TP
  exceeds them (kv_heads_per_core = max(1, kv / TP)). The block layout of prefix caching (`block_kv_cache_bytes`,
  `neuron/block_kv.py`): every position on every producer layer, in whole blocks, plus one spare block per layer.
- activations: the context-encoding graph as built (`neuron/attention.py`): prompts run in chunks of C tokens
  (`prefill_chunk`), so its peak is the float32 attention scores of one chunk, [batch, q_heads_per_core, C,
  keys] with keys = C (+ max_length when a prompt spans several chunks) on full layers and 2W (or W + C) on sliding
  layers, held about twice (scores and probabilities: XLA's buffer assignment of the Gemma 3 1B geometry), plus
  the chunk's hidden states and MLP shard. It no longer grows with the square of the context.
- a fixed runtime reserve per core.
Decode roofline: batch / (bytes read per step / HBM bandwidth), where a step reads every weight except the
embedding tables (only a few rows are gathered), plus the KV cache in use. For MoE it counts the top_k routed
experts of a token (the decode graph gathers only those experts' weights, `neuron/moe.py`); at batch > 1 distinct
tokens may route to different experts, so this bound is for batch 1 and optimistic above it.
Prefill bound: peak bf16 FLOP/s / (2 x active parameters per token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import GemmaPlan
from .errors import InputError

GIB = 1024**3
RUNTIME_RESERVE = 1 * GIB  # NEFF scratch, runtime and collectives buffers (estimate)


@dataclass(frozen=True)
class Instance:
    name: str
    cores: int  # NeuronCores usable as TP ranks (logical cores on Trn2, LNC=2)
    hbm_per_core: float  # bytes
    bandwidth_per_core: float  # bytes/s
    bf16_flops_per_core: float


# Public AWS figures: Trn1/Inf2 chips have 2 NeuronCore-v2 and 32 GiB HBM at 820 GB/s, 190 bf16 TFLOP/s;
# a Trn2 chip has 96 GiB at 2.9 TB/s and 667 dense bf16 TFLOP/s, exposed as 4 logical cores (LNC=2).
INSTANCES: dict[str, Instance] = {
    name: Instance(name, cores, hbm * GIB, bw, flops)
    for name, cores, hbm, bw, flops in [
        ("inf2.xlarge", 2, 16, 410e9, 95e12),
        ("inf2.8xlarge", 2, 16, 410e9, 95e12),
        ("inf2.24xlarge", 12, 16, 410e9, 95e12),
        ("inf2.48xlarge", 24, 16, 410e9, 95e12),
        ("trn1.2xlarge", 2, 16, 410e9, 95e12),
        ("trn1.32xlarge", 32, 16, 410e9, 95e12),
        ("trn2.3xlarge", 4, 24, 725e9, 166.75e12),
        ("trn2.48xlarge", 64, 24, 725e9, 166.75e12),
    ]
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class MemoryPlan:
    instance: str
    tp: int
    batch: int
    seq_len: int
    dtype: str
    weights_per_core: int
    kv_cache_per_core: int
    activations_per_core: int
    reserve_per_core: int
    hbm_per_core: int
    decode_tokens_per_s: float  # roofline upper bound, whole batch
    prefill_tokens_per_s: float  # compute upper bound

    @property
    def total_per_core(self) -> int:
        return self.weights_per_core + self.kv_cache_per_core + self.activations_per_core + self.reserve_per_core

    @property
    def fits(self) -> bool:
        return self.total_per_core <= self.hbm_per_core

    def to_json(self) -> dict:
        return {**asdict(self), "total_per_core": self.total_per_core, "fits": self.fits}


def check_tp(plan: GemmaPlan, tp: int, option: str = "--tp") -> None:
    """TP must split the query heads evenly and either split or replicate every layer type's KV heads."""
    if tp < 1:
        raise InputError(f"{option} {tp} must be at least 1")
    heads = plan.num_heads
    valid = [t for t in range(1, 129) if _tp_ok(plan, t)]
    if not _tp_ok(plan, tp):
        kvs = sorted({layer.num_kv_heads for layer in plan.layers})
        raise InputError(
            f"{option} {tp} does not divide the {heads} query heads or the KV heads {kvs} (each must divide or be "
            f"divided by TP); valid TP degrees: {', '.join(map(str, valid))}"
        )


def _tp_ok(plan: GemmaPlan, tp: int) -> bool:
    if plan.num_heads % tp:
        return False
    return all(layer.num_kv_heads % tp == 0 or tp % layer.num_kv_heads == 0 for layer in plan.layers)


def kv_heads_per_core(num_kv_heads: int, tp: int) -> int:
    return max(1, num_kv_heads // tp)


def kv_cache_bytes(plan: GemmaPlan, tp: int, batch: int, seq_len: int, dtype_bytes: int,
                   chunk: int | None = None) -> int:
    """KV bytes of the contiguous layout (`neuron/kv_cache.py`) for `batch` sequences of up to seq_len tokens (its
    max_length and max_context_length): sliding layers a ring of W slots, full layers seq_len slots plus `chunk`
    spare slots when seq_len > chunk (prompts prefilled in chunks). `chunk`: the neuron config's
    prefill_chunk_size; default the planner's (`prefill_chunk` at this batch, what the NxDI config takes when
    the context-encoding batch is the batch)."""
    chunk = chunk or prefill_chunk(plan, tp, batch, seq_len, seq_len)
    spare = chunk if seq_len > chunk else 0
    total = 0
    for layer in plan.layers:
        if layer.shares_kv:
            continue
        length = layer.window or seq_len + spare
        total += 2 * batch * length * kv_heads_per_core(layer.num_kv_heads, tp) * layer.head_dim * dtype_bytes
    return total


def window_blocks(window: int, block_size: int) -> int:
    """Blocks holding the keys a query can see before its chunk on a sliding layer: positions p0-W+1 .. p0-1 span
    at most this many (the block layout reads no more)."""
    return -(-(window - 1) // block_size) + 1


def block_kv_cache_bytes(plan: GemmaPlan, tp: int, batch: int, seq_len: int, dtype_bytes: int,
                         block_size: int) -> int:
    """KV bytes of the block layout (prefix caching, neuron/block_kv.py) for `batch` sequences of seq_len: vLLM hands
    out one block table for every layer, so each producer layer, sliding ones included, stores every position
    (rounded up to whole blocks: pa_num_blocks = batch x ceil(seq_len / block_size)), plus the one block that
    receives padding writes (NxDI's layout); sliding layers still read only the blocks inside their window."""
    slots = (batch * -(-seq_len // block_size) + 1) * block_size
    return sum(2 * slots * kv_heads_per_core(layer.num_kv_heads, tp) * layer.head_dim * dtype_bytes
               for layer in plan.layers if not layer.shares_kv)


def block_kv_decode_read_bytes(plan: GemmaPlan, tp: int, batch: int, seq_len: int, dtype_bytes: int,
                               block_size: int) -> int:
    """KV bytes one decode step reads in the block layout: every block of a full layer (its whole pool, read in
    place: the batch's blocks when vLLM's block count is the minimum), `window_blocks` blocks of a sliding layer
    (KV-shared layers read their producer's blocks again)."""
    total = 0
    for layer in plan.layers:
        length = -(-seq_len // block_size) * block_size
        if layer.window:
            length = min(length, window_blocks(layer.window, block_size) * block_size)
        total += 2 * batch * length * kv_heads_per_core(layer.num_kv_heads, tp) * layer.head_dim * dtype_bytes
    return total


def parameter_counts(plan: GemmaPlan) -> dict[str, int]:
    """Parameters by how they are held and read: 'sharded' (split over TP; includes all experts and the LM head,
    which NxDI keeps as its own copy even when tied), 'tables' (embedding tables: split over TP, only gathered),
    'replicated' (norms, router, scalars: on every core) and 'active' (read per decoded token: dense weights,
    the top_k routed experts, LM head and replicated)."""
    h = plan.hidden_size
    dense = replicated = experts_total = experts_active = linears = channels = 0
    for layer in plan.layers:
        d, nq, nkv = layer.head_dim, layer.num_heads, layer.num_kv_heads
        kv_width = 0 if layer.shares_kv else nkv * d * (1 if layer.k_eq_v else 2)
        layer_linears = 2 * h * nq * d + h * kv_width + 3 * h * layer.intermediate_size  # q, o, k(, v), MLP
        dense += layer_linears
        linears += layer_linears
        channels += nq * d + kv_width + h + 2 * layer.intermediate_size + h  # output channels (one scale each)
        replicated += 4 * h + 2 * d
        if plan.ple_dim:
            dense += 2 * h * plan.ple_dim
            replicated += h
        if layer.moe:
            per_expert = 3 * h * layer.moe.intermediate_size
            experts_total += layer.moe.num_experts * per_expert
            experts_active += layer.moe.top_k * per_expert  # routed decode (see module doc)
            channels += layer.moe.num_experts * (2 * layer.moe.intermediate_size + h)
            replicated += h * layer.moe.num_experts + layer.moe.num_experts + 4 * h
    tables = plan.vocab_size * h
    if plan.ple_dim:
        tables += plan.ple_vocab_size * plan.num_layers * plan.ple_dim
        dense += h * plan.num_layers * plan.ple_dim + plan.ple_dim
    head = plan.vocab_size * h
    replicated += h  # final norm
    return {
        "sharded": dense + experts_total + head,
        "tables": tables,
        "replicated": replicated,
        "active": dense + experts_active + head + replicated,
        # what `quantized: true` stores as int8/fp8 (attention, MLP, experts) and its float32 scales (per channel)
        "quantized": linears + experts_total,
        "quantized_active": linears + experts_active,
        "scales": channels,
        # the LM head's weight (in 'sharded' and 'active'), quantized only on request (`quantize_lm_head`), with one
        # scale per vocab row
        "head": head,
        "head_scales": plan.vocab_size,
    }


def weight_bytes(counts: dict[str, int], dtype_bytes: int, weights: str,
                 quantize_lm_head: bool = False) -> tuple[float, float]:
    """(bytes of the TP-sharded tensors, bytes read per decoded token) with `weights` = "model" (the model dtype),
    "int8" or "fp8" (`quantized: true`: attention/MLP/experts at 1 byte per parameter plus a float32 scale per
    output channel (per channel scheme); embeddings, LM head, norms, router, PLE stay in the model dtype), and with
    `quantize_lm_head` (neuron config quantize_lm_head: true) the LM head too, one scale per vocab row."""
    if weights not in WEIGHT_SCHEMES:
        raise InputError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_SCHEMES)}")
    if weights == "model":
        if quantize_lm_head:
            raise InputError("--quantize-lm-head needs --weights int8 or fp8 (quantized: true)")
        return (counts["sharded"] + counts["tables"]) * dtype_bytes, counts["active"] * dtype_bytes
    q, qa = counts["quantized"], counts["quantized_active"]
    scales = 4 * counts["scales"]
    if quantize_lm_head:
        q, qa, scales = q + counts["head"], qa + counts["head"], scales + 4 * counts["head_scales"]
    stored = (counts["sharded"] - q + counts["tables"]) * dtype_bytes + q + scales
    read = (counts["active"] - qa) * dtype_bytes + qa + scales
    return stored, read


WEIGHT_SCHEMES = ("model", "int8", "fp8")


def memory_plan(plan: GemmaPlan, instance: str, tp: int | None = None, batch: int = 1, seq_len: int | None = None,
                dtype: str = "bfloat16", block_size: int | None = None, num_blocks: int | None = None,
                weights: str = "model", kv_cache: str = "model", quantize_lm_head: bool = False,
                prefill_batch: int | None = None) -> MemoryPlan:
    """Per-core HBM plan and rooflines. `block_size`: the block KV layout of prefix caching (what vLLM's default
    makes vllm-neuron ask for), whose cache holds `num_blocks` blocks of every producer layer, sliding ones included
    (default ceil(seq_len / block_size) x batch, what vllm-neuron allocates); None: the contiguous layout (ring
    caches). weights: "model" | "int8" | "fp8" (quantized weights, see weight_bytes); kv_cache: "model" | "fp8"
    (`kv_cache_quant`: one byte per cached value); quantize_lm_head: the LM head quantized too (weight_bytes).
    prefill_batch: the sequences one context-encoding call takes (NxDI's ctx_batch_size; default the batch, NxDI's
    default; vllm-neuron prefills one): it sets the prompt chunk, hence the full layers' spare slots and the
    prefill activations."""
    if instance not in INSTANCES:
        raise InputError(f"unknown instance {instance!r}; known: {', '.join(INSTANCES)}")
    inst = INSTANCES[instance]
    tp = tp or max(t for t in range(1, inst.cores + 1) if inst.cores % t == 0 and _tp_ok(plan, t))
    if tp > inst.cores:
        raise InputError(f"--tp {tp} exceeds the {inst.cores} NeuronCores of {instance}")
    check_tp(plan, tp)
    seq_len = seq_len or min(plan.max_position_embeddings, 8192)
    if seq_len > plan.max_position_embeddings:
        raise InputError(
            f"--seq-len {seq_len} exceeds the model's maximum context of {plan.max_position_embeddings} tokens"
        )
    if batch < 1 or seq_len < 1:
        raise InputError("--batch and --seq-len must be at least 1")
    nbytes = DTYPE_BYTES[dtype]
    if kv_cache not in ("model", "fp8"):
        raise InputError(f"--kv-cache {kv_cache!r}: choose model or fp8")
    counts = parameter_counts(plan)
    stored, read = weight_bytes(counts, nbytes, weights, quantize_lm_head)
    weights_per_core = stored // tp + counts["replicated"] * nbytes
    kv_bytes = 1 if kv_cache == "fp8" else nbytes
    prefill_batch = prefill_batch or batch
    if block_size is None:
        kv = kv_cache_bytes(plan, tp, batch, seq_len, kv_bytes,
                            chunk=prefill_chunk(plan, tp, prefill_batch, seq_len, seq_len))
    else:
        blocks = num_blocks if num_blocks is not None else -(-seq_len // block_size) * batch
        kv = block_kv_cache_bytes(plan, tp, 1, blocks * block_size, kv_bytes, block_size)
    activations = prefill_activation_bytes(plan, tp, prefill_batch, seq_len, seq_len, nbytes)
    # Decode: stream the active weights once per step plus the KV cache in use, for the whole batch.
    step_bytes = read / tp + kv
    decode = batch * inst.bandwidth_per_core / step_bytes
    prefill = inst.bf16_flops_per_core * tp / (2 * counts["active"])
    return MemoryPlan(instance, tp, batch, seq_len, dtype, int(weights_per_core), int(kv), int(activations),
                      RUNTIME_RESERVE, int(inst.hbm_per_core), decode, prefill)


def largest_fit(plan: GemmaPlan, instance: str, tp: int | None = None, dtype: str = "bfloat16",
                seq_len: int | None = None, block_size: int | None = None, prefill_batch: int | None = None,
                **schemes: str | bool) -> tuple[int, int]:
    """(largest power-of-two context at batch 1, largest batch at `seq_len`, the requested context (default: the
    plan's default)) that fit; 0 if none. `block_size`, `prefill_batch`: as memory_plan's (its default block
    count)."""
    context = 0
    length = 128
    while length <= plan.max_position_embeddings:
        if memory_plan(plan, instance, tp, 1, length, dtype, block_size, prefill_batch=prefill_batch, **schemes).fits:
            context = length
        length *= 2
    batch = 0
    requested = memory_plan(plan, instance, tp, 1, seq_len, dtype, **schemes).seq_len
    b = 1
    while b <= 1024 and memory_plan(plan, instance, tp, b, requested, dtype, block_size, prefill_batch=prefill_batch, **schemes).fits:
        batch = b
        b *= 2
    return context, batch


# Float32 score budget of one full-attention layer in a prompt chunk (see prefill_chunk).
PREFILL_SCORE_BUDGET = 512 * 2**20
MAX_PREFILL_CHUNK = 4096
MIN_PREFILL_CHUNK = 128


def prefill_chunk(plan: GemmaPlan, tp: int, batch: int, max_length: int, max_context_length: int) -> int:
    """Prompt tokens per context-encoding call: the largest power of two <= 4096 (and >= 128) whose float32
    full-layer scores [batch, q_heads_per_core, C, max_length + C] fit PREFILL_SCORE_BUDGET, or the whole context
    when it is shorter. The NxDI config uses it as `prefill_chunk_size` unless the user sets one."""
    heads = -(-max(layer.num_heads for layer in plan.layers) // tp)
    chunk = MAX_PREFILL_CHUNK
    while chunk > MIN_PREFILL_CHUNK and 4 * batch * heads * chunk * (max_length + chunk) > PREFILL_SCORE_BUDGET:
        chunk //= 2
    return min(chunk, max_context_length)


def prefill_activation_bytes(plan: GemmaPlan, tp: int, batch: int, max_length: int, max_context_length: int,
                             dtype_bytes: int, chunk: int | None = None) -> int:
    """Peak activations of the context-encoding (chunk) graph per core, as `neuron/attention.py` builds it: the
    float32 scores of the widest layer held twice, or the chunk's widest MLP shard, whichever is larger, plus the
    residual stream. Within 3% of XLA's temp arena for the Gemma 3 1B geometry at 4096 and 16384 (sim tier)."""
    chunk = chunk or prefill_chunk(plan, tp, batch, max_length, max_context_length)
    chunked = max_context_length > chunk
    widest = 0
    for layer in plan.layers:
        if layer.window is None:
            keys = chunk + (max_length if chunked else 0)
        else:
            keys = layer.window + chunk if chunk <= layer.window else 2 * layer.window
        widest = max(widest, -(-layer.num_heads // tp) * chunk * keys)
    mlp = max(layer.intermediate_size for layer in plan.layers) // tp
    # Attention and MLP peak at different times; the residual stream lives throughout.
    attention = 2 * 4 * batch * widest
    feed_forward = batch * chunk * (2 * mlp + 4 * plan.hidden_size) * dtype_bytes
    return max(attention, feed_forward) + 2 * batch * chunk * plan.hidden_size * dtype_bytes


def format_plan(p: MemoryPlan) -> str:
    g = GIB
    return "\n".join([
        f"instance {p.instance}, TP {p.tp}, batch {p.batch}, seq_len {p.seq_len}, {p.dtype}",
        f"  weights      {p.weights_per_core / g:8.2f} GiB per core",
        f"  KV cache     {p.kv_cache_per_core / g:8.2f} GiB per core",
        f"  activations  {p.activations_per_core / g:8.2f} GiB per core",
        f"  reserve      {p.reserve_per_core / g:8.2f} GiB per core",
        f"  total        {p.total_per_core / g:8.2f} GiB of {p.hbm_per_core / g:.0f} GiB -> "
        + ("fits" if p.fits else "DOES NOT FIT"),
        f"  decode roofline  {p.decode_tokens_per_s:10.1f} tokens/s (batch {p.batch}, HBM-bandwidth bound)",
        f"  prefill bound    {p.prefill_tokens_per_s:10.1f} tokens/s (bf16 compute bound)",
    ])


def instance_table(dtype: str = "bfloat16", weights: str = "model", kv_cache: str = "model",
                   quantize_lm_head: bool = False) -> str:
    """Markdown matrix, public checkpoints x instances: for each pair that fits at 4096 tokens, the TP degree
    (the largest valid one the instance allows), the largest context that fits at batch 1, and the batch-1 decode
    roofline at 4096 tokens; "-" where the weights do not fit. `weights` / `kv_cache`: the quantization schemes
    (see memory_plan)."""
    from .public_models import PUBLIC_CONFIGS, public_plan

    schemes = {"weights": weights, "kv_cache": kv_cache, "quantize_lm_head": quantize_lm_head}

    rows = ["| model | " + " | ".join(INSTANCES) + " |", "|---|" + "---|" * len(INSTANCES)]
    for name in PUBLIC_CONFIGS:
        plan = public_plan(name)
        cells = []
        for instance in INSTANCES:
            result = memory_plan(plan, instance, None, 1, 4096, dtype, **schemes)
            if not result.fits:
                cells.append("-")
                continue
            context, _ = largest_fit(plan, instance, result.tp, dtype, **schemes)
            cells.append(f"TP{result.tp}, {context // 1024}K, {result.decode_tokens_per_s:.0f} tok/s")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scheme_table() -> str:
    """Markdown table, public checkpoints: parameters as NxDI stores them (the LM head's own copy of a tied
    embedding counted), weight bytes with bf16 and with int8/fp8 weights (`weight_bytes`), the average bytes per
    parameter of the int8/fp8 checkpoint, and the bytes a batch-1 decode step reads at 4096 tokens
    (active weights + bf16 KV cache, TP 1), also with the LM head quantized (`quantize_lm_head`)."""
    from .public_models import PUBLIC_CONFIGS, public_plan

    rows = ["| model | parameters stored | bf16 weights | int8 / fp8 weights | bytes per parameter (int8 / fp8) | decode read "
            "per token at 4K, bf16 -> int8 | int8 + LM head |", "|---|---|---|---|---|---|---|"]
    for name in PUBLIC_CONFIGS:
        plan = public_plan(name)
        counts = parameter_counts(plan)
        total = counts["sharded"] + counts["tables"] + counts["replicated"]
        plain, plain_read = weight_bytes(counts, 2, "model")
        quant, quant_read = weight_bytes(counts, 2, "int8")
        _, head_read = weight_bytes(counts, 2, "int8", quantize_lm_head=True)
        extra = 2 * counts["replicated"]
        kv = kv_cache_bytes(plan, 1, 1, min(4096, plan.max_position_embeddings), 2)
        rows.append(f"| {name} | {total / 1e9:.2f} B | {(plain + extra) / GIB:.1f} GiB | {(quant + extra) / GIB:.1f} "
                    f"GiB | {(quant + extra) / total:.2f} | {(plain_read + kv) / GIB:.2f} -> "
                    f"{(quant_read + kv) / GIB:.2f} GiB ({(quant_read + kv) / (plain_read + kv):.2f}x) | "
                    f"{(head_read + kv) / GIB:.2f} GiB ({(head_read + kv) / (plain_read + kv):.2f}x) |")
    return "\n".join(rows)


INSTANCE_ENV = "NXDI_GEMMA_INSTANCE"
# EC2 (Nitro) reports the instance type as the DMI product name, readable without privileges and inside containers.
DMI_PRODUCT_NAME = "/sys/devices/virtual/dmi/id/product_name"


def current_instance(environ: dict[str, str], dmi_product_name: str | None) -> str | None:
    """The INSTANCES name of this machine for memory checks: `NXDI_GEMMA_INSTANCE` when set ("none": skip the check,
    returns None), else the DMI product name when it is a known instance. Anything else is an InputError saying what
    to set: a check against a guessed HBM size would be a silent default. `dmi_product_name`: the file's content, or
    None when it does not exist (not EC2, e.g. the simulation tier)."""
    chosen = environ.get(INSTANCE_ENV)
    if chosen is not None:
        if chosen.strip().lower() == "none":
            return None
        if chosen not in INSTANCES:
            raise InputError(f"{INSTANCE_ENV}={chosen!r} is not a known instance; use one of "
                             f"{', '.join(INSTANCES)}, or 'none' to skip the HBM check")
        return chosen
    detected = (dmi_product_name or "").strip()
    if detected in INSTANCES:
        return detected
    found = f"this machine's DMI product name is {detected!r}" if detected else f"{DMI_PRODUCT_NAME} is absent"
    raise InputError(f"cannot tell which Neuron instance this is for the HBM check ({found}): set {INSTANCE_ENV} to "
                     f"one of {', '.join(INSTANCES)}, or to 'none' to skip the check")


def read_dmi_product_name(path: str = DMI_PRODUCT_NAME) -> str | None:
    """The DMI product name (EC2: the instance type), None when the file does not exist."""
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class SpeculationPlan:
    num_speculative_tokens: int
    acceptance: float  # per-proposal acceptance probability alpha
    tokens_per_step: float  # expected tokens per verification: (1 - alpha^(K+1)) / (1 - alpha)
    target_tokens_per_s: float  # plain decoding, batch 1 roofline
    speculative_tokens_per_s: float
    fits: bool  # target and draft (weights, KV cache, the larger activation peak) fit each core's HBM together

    @property
    def speedup(self) -> float:
        return self.speculative_tokens_per_s / self.target_tokens_per_s


def expected_tokens_per_step(acceptance: float, k: int) -> float:
    """Tokens a greedy verification of K proposals yields when each proposal is accepted with probability alpha
    independently of the others (Leviathan et al. 2023): sum of alpha^i for i = 0..K."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def speculation_plan(target: GemmaPlan, draft: GemmaPlan, instance: str, acceptance: float, k: int | None = None,
                     tp: int | None = None, seq_len: int | None = None, dtype: str = "bfloat16",
                     **schemes: str | bool) -> SpeculationPlan:
    """Batch-1 decode roofline with a draft on the same cores (NxDI fused speculation: one graph per step): a step
    reads the target once for the K + 1 verified tokens and the draft K times (both weights and KV cache in use),
    and yields `expected_tokens_per_step`. k None: the K in 1..8 with the most tokens/s. acceptance: the
    per-proposal rate alpha; a measured accepted/proposed rate r over K-token steps is lower than alpha
    (r = alpha (1 - alpha^K) / ((1 - alpha) K)), so using r here is conservative. `schemes` (weights=,
    kv_cache=, see memory_plan) apply to target and draft alike."""
    if not 0 <= acceptance <= 1:
        raise InputError(f"--acceptance {acceptance} must be in [0, 1]")
    if k is not None and k < 1:
        raise InputError(f"--num-speculative-tokens {k} must be at least 1")
    target_plan = memory_plan(target, instance, tp, 1, seq_len, dtype, **schemes)
    draft_plan = memory_plan(draft, instance, target_plan.tp, 1, min(target_plan.seq_len,
                                                                       draft.max_position_embeddings), dtype, **schemes)
    t_target, t_draft = 1 / target_plan.decode_tokens_per_s, 1 / draft_plan.decode_tokens_per_s

    both = (target_plan.weights_per_core + target_plan.kv_cache_per_core + draft_plan.weights_per_core
            + draft_plan.kv_cache_per_core + max(target_plan.activations_per_core, draft_plan.activations_per_core)
            + RUNTIME_RESERVE)
    fits = both <= INSTANCES[instance].hbm_per_core

    def plan_for(n: int) -> SpeculationPlan:
        tokens = expected_tokens_per_step(acceptance, n)
        return SpeculationPlan(n, acceptance, tokens, target_plan.decode_tokens_per_s,
                               tokens / (t_target + n * t_draft), fits)

    return plan_for(k) if k is not None else max((plan_for(n) for n in range(1, 9)),
                                                  key=lambda p: p.speculative_tokens_per_s)
