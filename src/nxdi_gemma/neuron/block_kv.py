"""Block KV layout and prefix caching for Gemma, on NxDI's own block-KV path (what vllm-neuron drives when it sets
`is_block_kv_layout` / `is_prefix_caching`): NxDI's model forward and model wrapper pick the 2-D (prefill x prefix)
bucket, slice the cached prefix off the prompt and pass `slot_mapping` (as `scatter_index`) and
`active_block_table`; token generation makes its slot mapping in the graph. NxDI's `BlockKVCacheManager` keeps one
cache shape for every layer, so this module has its own manager (per-layer shapes) and attention reads (per-layer
windows, KV sharing); the attention core stays `ops.attention_over_segments` (Gemma's scale, softcap, float32
softmax). Plain torch, no NKI kernel.

NxDI calls checked against NxDI 0.8 (cd3abf3) and 0.9 (c63afe0), identical in both: `NeuronBaseModel.get_model_output`
calls `kv_mgr.get_cache(seq_ids=, seq_len=, is_for_context_encoding=, windowed_context_encoding_window_idx=,
**kwargs)` when a prefix may exist or in token generation, and `kv_mgr.update_cache(is_for_context_encoding=,
seq_ids=, position_ids=, new_key_values=, seq_len=, windowed_context_encoding_window_idx=, **kwargs)` with
`scatter_index` = the slot mapping (-1 for padding), `active_block_table` and `kvcache_buffer` among the kwargs; the
decoder layers get the same kwargs. The cache parameters are NxDI's aliased state (`past_key_values`, [k, v] per
slot), as in `KVCacheManager`. Untested on Trainium/Inferentia hardware.

Layout: per KV-producing layer a K and a V cache of shape (pa_num_blocks + 1, block_size, kv_heads, head_dim) (NxDI's
prefix-caching layout; the extra block receives padding writes, as NxDI's). Every producer, sliding or full, stores
every position (vLLM allocates blocks per token for every layer); sliding layers read only the blocks inside their
window. KV-shared Gemma 4 layers own no cache and read their producer's blocks. Index tensors are int32; masks are
comparisons combined with `torch.where`, no `torch.remainder`.
"""

from __future__ import annotations

import torch
from neuronx_distributed_inference.modules.kvcache.kv_cache_manager import KVCacheManager
from torch import nn

from .. import ops
from ..config import GemmaPlan
from ..errors import ConfigError
from ..planning import window_blocks
from .kv_cache import LayerCaches


class GemmaBlockKVCacheManager(LayerCaches, KVCacheManager):
    """Per-layer block caches (see the module docstring). `block_layout` tells our attention to take the block
    path."""

    block_layout = True

    def __init__(self, config, layers: nn.ModuleList, global_rank=None):
        plan: GemmaPlan = config.gemma_plan
        neuron_config = config.neuron_config
        super().__init__(config, num_kv_head=config.num_key_value_heads, global_rank=global_rank,
                         layer_to_cache_size_mapping=[1] * plan.num_layers)
        self.num_blocks, self.block_size = neuron_config.pa_num_blocks, neuron_config.pa_block_size
        # Heads first: the pool of one head, (blocks x block_size) x D, is then one contiguous matrix that decode
        # multiplies in place (NxDI's (blocks, block_size, heads, D) would need a transposed copy of it per step).
        self.init_layer_caches(plan, lambda i: (
            layers[i].self_attn.num_key_value_heads, self.num_blocks + 1, self.block_size, plan.layers[i].head_dim))

    def get_cache(self, *args, **kwargs):
        """Nothing is read here: each layer reads its own blocks (`prior` or `pool`; which blocks depends on its
        window and the positions). One None per layer for NxDI's layer loop."""
        return [None] * len(self.windows)

    def prior(self, idx: int, first: torch.Tensor, block_table: torch.Tensor | None, kvcache_buffer=None):
        """The cached keys/values layer idx may attend before a chunk (or token) starting at position `first`
        ([B, 1] int32), gathered from the blocks of the table: (k, v, key_positions) with k, v [B, kv_heads, T, D]
        and key_positions [B, T] int32 (the logical position each key holds; blocks past the table's end get
        positions >= first, so masks drop them). Full layers read every block of the table, sliding layers only
        `window_blocks` from the one holding first - W + 1."""
        table = block_table.to(torch.int32)
        batch, width = table.shape
        bs = self.block_size
        window = self.windows[idx]
        if window is None:
            blocks = torch.arange(width, device=table.device, dtype=torch.int32)[None, :].expand(batch, width)
        else:
            count = min(window_blocks(window, bs), width)
            # compare + select, the forms NxDI's graphs hold (no int32 clamp there; test_op_set.py)
            oldest = first - (window - 1)
            start = torch.where(oldest > 0, oldest, 0) // bs  # [B, 1]
            blocks = start + torch.arange(count, device=table.device, dtype=torch.int32)[None, :]
            table = torch.gather(table, 1, torch.where(blocks < width, blocks, width - 1).to(torch.int64))
        offsets = torch.arange(bs, device=table.device, dtype=torch.int32)
        key_positions = (blocks[:, :, None] * bs + offsets[None, None, :]).reshape(batch, -1)
        k_cache, v_cache = self._fetch_cache(idx, kvcache_buffer)
        heads, pool_blocks = k_cache.shape[0], k_cache.shape[1]
        # One gather on dim 0 of the (heads x blocks) view, as NxDI reads its (blocks, heads, ...) chunked-prefill
        # cache: index_select on dim 1 has XLA transpose the whole pool first.
        index = (torch.arange(heads, device=table.device, dtype=torch.int32)[:, None] * pool_blocks
                 + table.reshape(1, -1)).reshape(-1)

        def read(cache: torch.Tensor) -> torch.Tensor:
            picked = cache.flatten(0, 1).index_select(0, index)  # [H * B * n, bs, D]
            return picked.reshape(heads, batch, -1, cache.shape[3]).transpose(0, 1)

        return read(k_cache), read(v_cache), key_positions

    def pool(self, idx: int, first: torch.Tensor, block_table: torch.Tensor, kvcache_buffer=None):
        """Layer idx's whole block pool, read in place for a decode step at position `first` ([B, 1] int32):
        (k, v, key_positions) with k, v [kv_heads, (num_blocks + 1) * block_size, D] (views of the cache, shared by
        every sequence) and key_positions [B, (num_blocks + 1) * block_size] int32: the logical position a slot
        holds for each sequence, or a position >= first (never visible) for slots of other sequences' blocks.

        From the table's blocks before `first` (logical block j holds positions j*bs ..; blocks from first on hold
        nothing yet, and a padded table may repeat a real block there), an inverse table: pool block -> logical
        block of that sequence, one scatter of B x width values. The values are float32 (exact below 2^24 blocks):
        a float scatter is the path NxDI's own KV writes take, where neuronx-cc 2.32 announces hard errors on
        integer scatter paths."""
        table = block_table.to(torch.int32)
        batch, width = table.shape
        bs = self.block_size
        pool_blocks = self.num_blocks + 1
        logical = torch.arange(width, device=table.device, dtype=torch.int32)[None, :].expand(batch, width)
        # Blocks holding no cached position go to a spare column past the pool, dropped below.
        target = torch.where(logical * bs < first, table, pool_blocks)
        rows = torch.arange(batch, device=table.device, dtype=torch.int32)[:, None].expand(batch, width)
        inverse = torch.full((batch, pool_blocks + 1), -1, device=table.device, dtype=torch.float32)
        inverse = inverse.index_put((rows, target), logical.float())[:, :pool_blocks].to(torch.int32)
        offsets = torch.arange(bs, device=table.device, dtype=torch.int32)
        held = inverse[:, :, None] * bs + offsets[None, None, :]
        key_positions = torch.where(inverse[:, :, None] >= 0, held, first[:, :, None]).reshape(batch, -1)
        k_cache, v_cache = self._fetch_cache(idx, kvcache_buffer)
        return k_cache.flatten(1, 2), v_cache.flatten(1, 2), key_positions

    def update_cache(self, is_for_context_encoding, seq_ids, position_ids, new_key_values, seq_len,
                     scatter_index=None, kvcache_buffer=None, **kwargs):
        """Write every producer's new K/V at its slot (`scatter_index` = the slot mapping; -1, padding, goes to the
        extra block). Returns [k, v] per cache slot, in slot order (what NxDI aliases)."""
        if scatter_index is None:
            raise ConfigError("block KV layout needs a slot_mapping for every call (NxDI passes it as scatter_index)")
        slots = scatter_index.reshape(-1).to(torch.int32)
        slots = torch.where(slots < 0, torch.full_like(slots, self.num_blocks * self.block_size), slots)
        # (head, block, offset) indices into the 4-D cache: a scatter straight on the aliased cache (a reshape
        # around it would hide the in-place update from the compiler).
        block = slots // self.block_size
        offset = slots - block * self.block_size
        updated = []
        for idx in self.producers:
            for cache, new in zip(self._fetch_cache(idx, kvcache_buffer), new_key_values[idx], strict=True):
                heads = torch.arange(cache.shape[0], device=cache.device, dtype=torch.int32)[:, None]
                rows = new.transpose(0, 1).reshape(cache.shape[0], -1, cache.shape[3]).to(cache.dtype)  # [H, B*S, D]
                updated.append(cache.index_put((heads, block[None, :], offset[None, :]), rows))
        return updated


def block_attention(attn, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, position_ids: torch.Tensor,
                    kv_mgr: GemmaBlockKVCacheManager, active_block_table, kvcache_buffer,
                    is_for_context_encoding: bool) -> torch.Tensor:
    """Attention of a prompt chunk (positions p0 .. p0+C-1, right-padded) or of decode tokens over the layer's cached
    blocks and the active tokens. Masks from positions: a cached key at position k is visible to a query at q iff
    k < p0 (the chunk's own tokens come from the active segment) and, on a sliding layer, k > q - W; active keys
    causally (and within W on a sliding layer).

    Which cached keys: a prompt chunk gathers its sequences' blocks (`prior`, as NxDI's block KV read). A decode
    step on a full layer multiplies the whole block pool in place (`pool`: no per-step copy of the layer's cache;
    the pool is the batch's blocks when vLLM's block count is the minimum the README gives) and masks the slots
    that are not its sequence's; on a sliding layer it gathers only the blocks inside the window."""
    positions = position_ids.to(torch.int32)
    first = positions[:, :1]
    length = Q.shape[2]
    window = attn.gemma_window
    i = torch.arange(length, device=Q.device, dtype=torch.int32)
    active = i[None, :] <= i[:, None]
    if window is not None:
        active = torch.where(active, (i[:, None] - i[None, :]) < window, False)
    segments = [(K, V, active[None, None])]
    if active_block_table is None or active_block_table.dim() != 2:
        prior = None  # no prefix: NxDI passes a 1-D placeholder table
    elif window is None and not is_for_context_encoding:
        prior = kv_mgr.pool(attn.layer_index, first, active_block_table, kvcache_buffer)
    else:
        prior = kv_mgr.prior(attn.layer_index, first, active_block_table, kvcache_buffer)
    if prior is not None:
        k_prior, v_prior, keys = prior
        visible = keys[:, None, :] < first[:, :, None]  # [B, 1, T]
        if window is not None:
            query = first + i[None, :]  # [B, S]: the chunk's positions (padding's never read)
            visible = torch.where(visible, keys[:, None, :] > query[:, :, None] - window, False)  # [B, S, T]
        segments.insert(0, (k_prior, v_prior, visible[:, None]))
    return ops.attention_over_segments(Q, segments, attn.gemma_scale, attn.gemma_softcap, attn.fp32_accumulation)
