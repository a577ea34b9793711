"""CPU reference runtime: runs a GemmaPlan with a preallocated KV cache.

Cache layout (spec 2.6, 5.4): full layers keep every slot; sliding layers keep a ring of W slots (a slot's ring
index is slot % W); KV-shared Gemma 4 layers own no cache and attend to exactly the keys their source layer
attended to in the same forward pass. Slots are absolute indices in the left-padded batch, so a sliding window
covers the same real tokens whatever a row's padding; RoPE positions are per row (slot - padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .checkpoint import load_state_dict
from .config import GemmaPlan, LayerPlan, load_plan
from .errors import InputError
from .layers import AttentionWeights, GemmaBlock, make_norm, per_layer_inputs


class LayerCache:
    """K/V of one producer layer: [B, KV, C, D] with the absolute slot held by each of the C entries (-1 = empty)."""

    def __init__(self, batch: int, layer: LayerPlan, capacity: int, dtype: torch.dtype):
        shape = (batch, layer.num_kv_heads, capacity, layer.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.slots = torch.full((capacity,), -1, dtype=torch.long)
        self.ring = layer.window is not None
        self.capacity = capacity

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        keep = slice(max(0, k.shape[2] - self.capacity), None)  # a ring only needs its last W entries
        k, v, slots = k[:, :, keep], v[:, :, keep], slots[keep]
        index = slots % self.capacity if self.ring else slots
        self.k[:, :, index] = k
        self.v[:, :, index] = v
        self.slots[index] = slots

    def attend_keys(
        self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, past: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new K/V and return every key the new queries may need (keys, values, their slots)."""
        if not self.ring:
            self.write(k, v, slots)
            end = past + k.shape[2]
            return self.k[:, :, :end], self.v[:, :, :end], self.slots[:end]
        if k.shape[2] == 1:  # decode: the ring after the write holds exactly the window
            self.write(k, v, slots)
            # Oldest first, as HF's cache keeps them: the same summation order, hence bit-equal bf16 results.
            shift = -int((slots[-1] + 1) % self.capacity)
            return (torch.roll(self.k, shift, 2), torch.roll(self.v, shift, 2), torch.roll(self.slots, shift, 0))
        if past == 0:  # prefill into an empty cache: the new tokens are all there is
            self.write(k, v, slots)
            return k, v, slots
        # Several new tokens: early queries need ring entries the write would overwrite.
        keys = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), torch.cat([self.slots, slots])
        self.write(k, v, slots)
        return keys


@dataclass
class KVCache:
    """All producer layers' caches plus which slots of each row are real tokens (False = left padding)."""

    layers: dict[int, LayerCache]
    key_valid: torch.Tensor  # bool [B, max_len]
    max_len: int
    past: int = 0  # slots filled so far

    @classmethod
    def allocate(cls, plan: GemmaPlan, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:
        layers = {
            layer.index: LayerCache(batch, layer, min(layer.window or max_len, max_len), dtype)
            for layer in plan.layers
            if not layer.shares_kv
        }
        return cls(layers, torch.ones(batch, max_len, dtype=torch.bool), max_len)

    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers.values())

    def visible(self, query_slots: torch.Tensor, key_slots: torch.Tensor, window: int | None) -> torch.Tensor:
        return ops.visibility(query_slots, key_slots, self.key_valid[:, key_slots.clamp(min=0)], window)


class CpuAttention(AttentionWeights):
    """Gemma attention with the HF parameter names (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm)."""

    def __init__(self, plan: GemmaPlan, layer: LayerPlan):
        super().__init__(plan, layer)
        self.layer, self.scale, self.softcap = layer, plan.attention_scale, plan.attn_logit_softcap
        self.register_buffer("inv_freq", layer.rope.inv_freq(), persistent=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:2], n, self.layer.head_dim)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        layer = self.layer
        cos, sin = ops.rope_cos_sin(self.inv_freq, step.positions, x.dtype)
        q = self._heads(self.q_proj(x), layer.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = ops.apply_rope(q.transpose(1, 2), cos, sin)
        if layer.shares_kv:
            keys, values, slots = step.shared[layer.kv_source]
        else:
            k_raw = self._heads(self.k_proj(x), layer.num_kv_heads)
            v = k_raw if layer.k_eq_v else self._heads(self.v_proj(x), layer.num_kv_heads)  # K=V: raw K (spec 5.3)
            k = self.k_norm(k_raw) if self.k_norm is not None else k_raw
            if self.v_norm is not None:
                v = self.v_norm(v)
            k = ops.apply_rope(k.transpose(1, 2), cos, sin)
            keys, values, slots = step.cache.layers[layer.index].attend_keys(k, v.transpose(1, 2), step.slots, step.past)
            step.shared[layer.index] = (keys, values, slots)
        visible = step.cache.visible(step.slots, slots, layer.window)
        out = ops.attention(q, keys, values, visible, self.scale, self.softcap)
        return self.o_proj(out)


class RowLayerCache:
    """K/V of one producer layer where every row has its own length (speculative decoding: rows accept different
    numbers of draft tokens): [B, KV, C, D] plus the position held by each entry of each row, [B, C] (-1 = empty).

    Sliding layers keep a ring of C = W + extra entries at `position % C`. A forward of S new tokens evicts the
    entries S positions older than C; with extra >= S - 1 those are all older than the window of the first new query,
    so rejecting some of the new tokens afterwards (`rollback`) never needs an evicted entry back: a rejected token's
    ring entry only ever replaced a key already outside every later window. Full layers keep every position.
    """

    def __init__(self, batch: int, layer: LayerPlan, capacity: int, dtype: torch.dtype):
        shape = (batch, layer.num_kv_heads, capacity, layer.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.pos = torch.full((batch, capacity), -1, dtype=torch.long)
        self.ring = layer.window is not None
        self.capacity = capacity

    def rows(self, rows: slice) -> RowLayerCache:
        """A view of some rows (writes go to this cache)."""
        view = object.__new__(RowLayerCache)
        view.k, view.v, view.pos = self.k[rows], self.v[rows], self.pos[rows]
        view.ring, view.capacity = self.ring, self.capacity
        return view

    def write(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        keep = slice(max(0, k.shape[2] - self.capacity), None)  # a ring only needs its last C entries
        k, v, pos = k[:, :, keep], v[:, :, keep], pos[:, keep]
        index = pos % self.capacity if self.ring else pos
        row = torch.arange(pos.shape[0])[:, None].expand_as(index)
        self.k[row, :, index] = k.transpose(1, 2)
        self.v[row, :, index] = v.transpose(1, 2)
        self.pos[row, index] = pos

    def attend_keys(
        self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, past: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new K/V (pos [B, S]) and return the keys the new queries may need with their positions
        [B, T]; invisible ones are masked by `RowKVCache.visible`."""
        if not self.ring:
            self.write(k, v, pos)
            return self.k, self.v, self.pos
        # Early queries may need ring entries this write overwrites: attend over the old ring and the new keys.
        keys = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), torch.cat([self.pos, pos], dim=1)
        self.write(k, v, pos)
        return keys

    def rollback(self, lengths: torch.Tensor) -> None:
        """Forget every entry at a position >= its row's length (rejected draft tokens)."""
        self.pos.masked_fill_(self.pos >= lengths[:, None], -1)


@dataclass
class RowKVCache:
    """Per-row-length cache of every producer layer; lengths [B] = tokens held per row (no padding: a row's
    positions are 0 .. length-1). Used by speculative decoding (`speculation.generate`)."""

    layers: dict[int, RowLayerCache]
    lengths: torch.Tensor
    max_len: int

    @classmethod
    def allocate(cls, plan: GemmaPlan, batch: int, max_len: int, dtype: torch.dtype, ring_extra: int) -> RowKVCache:
        """ring_extra: how many entries sliding rings keep beyond the window; at least (new tokens per forward - 1)
        when tokens may be rolled back (see RowLayerCache)."""
        layers = {
            layer.index: RowLayerCache(batch, layer, min(layer.window + ring_extra if layer.window else max_len,
                                                         max_len), dtype)
            for layer in plan.layers
            if not layer.shares_kv
        }
        return cls(layers, torch.zeros(batch, dtype=torch.long), max_len)

    def rows(self, rows: slice) -> RowKVCache:
        return RowKVCache({i: c.rows(rows) for i, c in self.layers.items()}, self.lengths[rows], self.max_len)

    def visible(self, query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """bool [B, 1, S, T]: query_pos [B, S], key_pos [B, T] (-1 = empty); sliding layers see q - W < k <= q."""
        q, k = query_pos[:, :, None], key_pos[:, None, :]
        ok = (k <= q) & (k >= 0)
        if window is not None:
            ok = ok & (q - k < window)
        return ok[:, None]

    def rollback(self, lengths: torch.Tensor) -> None:
        """Shorten each row to `lengths` (<= its current length), in place."""
        for cache in self.layers.values():
            cache.rollback(lengths)
        self.lengths.copy_(lengths)


@dataclass
class _Step:
    cache: KVCache | RowKVCache
    slots: torch.Tensor  # [S] absolute slots of the new tokens ([B, S] positions with a RowKVCache)
    positions: torch.Tensor  # [B, S] RoPE positions
    past: int
    shared: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class GemmaTextModel(nn.Module):
    def __init__(self, plan: GemmaPlan):
        super().__init__()
        self.plan = plan
        self.embed_tokens = nn.Embedding(plan.vocab_size, plan.hidden_size)
        self.layers = nn.ModuleList(GemmaBlock(plan, layer, CpuAttention(plan, layer)) for layer in plan.layers)
        self.first_shared = next((layer.index for layer in plan.layers if layer.shares_kv), plan.num_layers)
        self.norm = make_norm(plan, plan.hidden_size)
        if plan.ple_dim:
            self.embed_tokens_per_layer = nn.Embedding(plan.ple_vocab_size, plan.num_layers * plan.ple_dim)
            self.per_layer_model_projection = nn.Linear(plan.hidden_size, plan.num_layers * plan.ple_dim, bias=False)
            self.per_layer_projection_norm = make_norm(plan, plan.ple_dim)

    def forward(self, ids: torch.Tensor, step: _Step, last_only: bool = False) -> torch.Tensor:
        """Hidden states after the final norm. last_only: only the last position's are needed, so KV-shared layers
        (which write no cache) run on that position alone, as HF's generate() does (spec 5.4; numerically neutral)."""
        h = ops.scaled_embedding(self.embed_tokens.weight, ids, self.plan.hidden_size)
        ple = None
        if self.plan.ple_dim:
            ple = per_layer_inputs(
                self.plan, ids, h, self.embed_tokens_per_layer, self.per_layer_model_projection,
                self.per_layer_projection_norm,
            )
        for i, block in enumerate(self.layers):
            if last_only and i == self.first_shared and h.shape[1] > 1:
                h, step.slots, step.positions = h[:, -1:], step.slots[..., -1:], step.positions[:, -1:]
                ple = None if ple is None else ple[:, -1:]
            attn = block.self_attn(block.attention_input(h), step)
            h = block.after_attention(h, attn, None if ple is None else ple[:, :, i])
        return self.norm(h)


class GemmaForCausalLM(nn.Module):
    """Parameter names equal Hugging Face's *ForCausalLM names (`model.…`, `lm_head.weight` when untied)."""

    def __init__(self, plan: GemmaPlan):
        super().__init__()
        self.plan = plan
        self.model = GemmaTextModel(plan)
        self.lm_head = None if plan.tie_word_embeddings else nn.Linear(plan.hidden_size, plan.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return ops.softcap(nn.functional.linear(h, weight), self.plan.final_logit_softcap)

    @torch.inference_mode()
    def forward_step(self, ids: torch.Tensor, cache: KVCache, pads: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Run new tokens ids [B, S] at the next cache slots; returns logits [B, S or 1, V]."""
        past = cache.past
        if past + ids.shape[1] > cache.max_len:
            raise InputError(
                f"sequence of {past + ids.shape[1]} tokens exceeds the configured maximum of {cache.max_len}; "
                "raise --max-seq-len or shorten the prompt / --max-new-tokens"
            )
        slots = torch.arange(past, past + ids.shape[1])
        positions = (slots[None, :] - pads[:, None]).clamp(min=0)
        h = self.model(ids, _Step(cache, slots, positions, past), last_only)
        cache.past = past + ids.shape[1]
        if last_only:
            h = h[:, -1:]
        return self.logits(h)


    @torch.inference_mode()
    def forward_rows(self, ids: torch.Tensor, cache: RowKVCache, last_only: bool = False) -> torch.Tensor:
        """Run new tokens ids [B, S] at each row's next positions of a RowKVCache; logits [B, S or 1, V]."""
        return self.logits(self.hidden_rows(ids, cache, last_only))

    @torch.inference_mode()
    def hidden_rows(self, ids: torch.Tensor, cache: RowKVCache, last_only: bool = False) -> torch.Tensor:
        """`forward_rows` up to the final norm: hidden states [B, S or 1, H]."""
        positions = cache.lengths[:, None] + torch.arange(ids.shape[1])
        if int(positions.max()) >= cache.max_len:
            raise InputError(
                f"sequence of {int(positions.max()) + 1} tokens exceeds the configured maximum of {cache.max_len}; "
                "raise --max-seq-len or shorten the prompt / --max-new-tokens"
            )
        h = self.model(ids, _Step(cache, positions, positions, 0), last_only)
        cache.lengths += ids.shape[1]  # in place: a row view's lengths are its parent's
        return h[:, -1:] if last_only else h


@dataclass
class SamplingParams:
    """Greedy when temperature == 0 (the default)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise InputError(f"top_k={self.top_k} must be >= 0 (0 = no top-k)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, the new tokens (cut after EOS when stopping on EOS)
    logits: torch.Tensor | None  # float32 [B, steps, V]: the logits each new token was chosen from


def choose(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from last-position logits [B, V]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) > sampling.top_p  # keep the token crossing top_p
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, S] left-padded, and each row's number of pad slots."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([width - len(p) for p in prompts], dtype=torch.long)


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise InputError("no prompts given; pass at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty; give at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


@torch.inference_mode()
def generate(
    model: GemmaForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_on_eos: bool = True,
    max_seq_len: int | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Prefill the left-padded batch, then decode token by token."""
    plan, sampling = model.plan, sampling or SamplingParams()
    check_prompts(prompts, plan.vocab_size)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1")
    ids, pads = left_pad(prompts, plan.pad_token_id or 0)
    limit = max_seq_len or plan.max_position_embeddings
    needed = ids.shape[1] + max_new_tokens
    if needed > limit:
        raise InputError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds the maximum "
            f"sequence length {limit}; shorten the prompt or lower --max-new-tokens"
        )
    cache = KVCache.allocate(plan, len(prompts), needed, model.dtype)
    cache.key_valid[:, : ids.shape[1]] = torch.arange(ids.shape[1])[None, :] >= pads[:, None]
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = torch.tensor(plan.eos_token_ids or [-1])
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out, kept = [], []
    logits = model.forward_step(ids, cache, pads, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        token = choose(logits, sampling, generator)
        if stop_on_eos:
            token = torch.where(done, torch.full_like(token, plan.pad_token_id or 0), token)
        out.append(token)
        if keep_logits:
            kept.append(logits.float())
        if stop_on_eos:
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            logits = model.forward_step(token[:, None], cache, pads, last_only=True)[:, -1]
    tokens = torch.stack(out, dim=1).tolist()
    if stop_on_eos:
        tokens = [cut_after_eos(row, plan.eos_token_ids) for row in tokens]
    return Generation(tokens, torch.stack(kept, dim=1) if keep_logits else None)


def cut_after_eos(row: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """The tokens up to and including the first EOS."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[: i + 1]
    return row


def load_model(model_dir, dtype: torch.dtype = torch.float32, progress: bool = True) -> GemmaForCausalLM:
    """Build the plan from config.json and load the safetensors weights into a CPU model (no transformers)."""
    plan = load_plan(model_dir)
    with torch.device("meta"):
        model = GemmaForCausalLM(plan)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    state = load_state_dict(model_dir, plan, expected, dtype, progress)
    model.load_state_dict(state, assign=True, strict=True)
    for block, layer in zip(model.model.layers, plan.layers, strict=True):
        block.self_attn.inv_freq = layer.rope.inv_freq()  # non-persistent buffers were built on "meta"
    return model.eval()
