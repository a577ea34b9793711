"""Per-layer KV caches for Gemma on NxDI's KVCacheManager.

Overrides checked against NxDI 0.8 (cd3abf3) and 0.9 (c63afe0): KVCacheManager.__init__, _fetch_cache, get_cache,
update_cache, get_kv_by_layer_id, update_kv_by_layer_id, _get_index_to_update_new_position; and the helpers
`kvcache.utils.dynamic_update_slice(tensor, update, start_indices)` and `fill_prefix(cache, prefix_cache)`, the same
in both (an XLA DynamicUpdateSlice on device, slice assignment in CPU mode). A quantized cache (`kv_cache_quant`)
uses the base's kv_quant_config, cache_dtype, _quantize_cache and _dequantize_cache (the same in both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from neuronx_distributed.utils import cpu_mode
from neuronx_distributed_inference.modules.kvcache.kv_cache_manager import KVCacheManager
from neuronx_distributed_inference.modules.kvcache.utils import dynamic_update_slice, fill_prefix
from torch import nn

from ..config import GemmaPlan

if TYPE_CHECKING:  # attention.py imports block_kv.py, which imports this module
    from .attention import ForwardState
    from .config import GemmaInferenceConfig


class LayerCaches:
    """What our cache managers (this module's and block_kv.py's) share, before NxDI's KVCacheManager in their bases:
    one K and one V cache per KV-producing layer, each of its own shape (NxDI's `past_key_values`, [k, v] per
    slot, aliased as the cache state), and KV-shared Gemma 4 layers reading their producer's slot."""

    def init_layer_caches(self, plan: GemmaPlan, shape_of: Callable[[int], tuple[int, ...]]) -> None:
        """`shape_of(layer_index)`: the cache shape of a producer layer."""
        self.windows = [layer.window for layer in plan.layers]
        self.producers = plan.kv_producers
        slot = {index: n for n, index in enumerate(self.producers)}
        self.slot_of = [slot[layer.kv_source] for layer in plan.layers]
        self.k_shapes = self.v_shapes = [shape_of(i) for i in self.producers]
        self.past_key_values = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, dtype=self.cache_dtype), requires_grad=False)
            for shape in self.k_shapes for _ in ("k", "v")
        )

    def _fetch_cache(self, idx: int, kvcache_buffer=None):
        return super()._fetch_cache(self.slot_of[idx], kvcache_buffer)


class GemmaKVCacheManager(LayerCaches, KVCacheManager):
    """Per-layer cache shapes: full layers hold max_length slots (position p at slot p; sliced to a smaller bucket
    for token generation; plus spare slots when prompts are prefilled in chunks or steps speculate), sliding layers
    a ring of R slots (position p at slot p % R; R = W, or W + S - 2 under fused speculation of S tokens per step),
    each with its own KV heads and head dim; KV-shared Gemma 4 layers own none and read their source layer's.

    Context encoding runs the prompt in chunks (one fixed-size graph per chunk, see `NeuronGemmaForCausalLM`):
    `prefill_prior` gives a chunk's attention the cache rows of its sequences, and the chunk's K/V are written at
    their positions (full layers) or merged into the ring (sliding layers), in place, with dynamic-update-slices
    (the forms NxDI's own caches use; test/sim/test_op_set.py). Token generation writes through NxDI's scatter at
    position (or position % W)."""

    def __init__(self, config: GemmaInferenceConfig, layers: nn.ModuleList, global_rank, state: ForwardState):
        plan = config.gemma_plan
        # The base allocates one cache per layer from this mapping; give it 1-slot stubs and build ours below.
        super().__init__(config, num_kv_head=config.num_key_value_heads, global_rank=global_rank,
                         layer_to_cache_size_mapping=[1] * plan.num_layers)
        batch = config.neuron_config.kv_cache_batch_size + config.neuron_config.kv_cache_padding_size
        self.state = state
        # Full layers read the cache in context encoding only when a prompt can span several chunks.
        self.chunked_prefill = config.neuron_config.max_context_length > config.neuron_config.prefill_chunk_size
        self.full_length = config.neuron_config.max_length
        # Full layers under chunked prefill keep one chunk of spare slots after max_length: a chunk's write is one
        # dynamic-update-slice at its first position, which must fit whole (never clamped onto cached tokens).
        # Fused speculation writes up to `speculation_spare_slots` positions past the last kept one (a verification
        # of S = K + 1 tokens that keeps one): the same spare slots take them near max_length.
        speculative = getattr(config.neuron_config, "speculation_spare_slots", 0)
        spare = max(config.neuron_config.prefill_chunk_size if self.chunked_prefill else 0, speculative)
        # Sliding rings: a step writes positions p .. p+S-1 and the next may start at p+1, whose window reaches back
        # to p+2-W; slot p+S-1 of a W-slot ring held p+S-1-W, still needed when S > 2. W + S - 2 slots keep every
        # position a later query can see (NxDI sizes its own spec-decode rings the same way). Masks hide the
        # rejected positions (see attention.decode_attention).
        self.rings = [None if layer.window is None else layer.window + max(speculative - 1, 0)
                      for layer in plan.layers]
        self.init_layer_caches(plan, lambda i: (
            batch, layers[i].self_attn.num_key_value_heads, self.rings[i] or self.full_length + spare,
            plan.layers[i].head_dim))

    def _fetch_cache(self, idx: int, kvcache_buffer=None):
        k_cache, v_cache = super()._fetch_cache(idx, kvcache_buffer)
        if self._as_bytes:
            return k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        return k_cache, v_cache

    @property
    def _as_bytes(self) -> bool:
        """In NxDI's CPU mode an fp8 cache is moved (gathered, scattered, merged) as its bytes: the same data, and
        torch's CPU kernels have no indexing for float8. Viewed back as fp8 where it is read (`_dequantize_cache`)
        and where the updated cache leaves the graph (`update_cache`). Never on device: torch-xla 2.9 has no lowering
        for a dtype view (`aten::view_copy.dtype` falls back to the CPU), so a traced graph would copy the cache to
        the host and freeze it as a constant instead of reading its aliased state (test/sim/test_xla_quantized.py)."""
        return cpu_mode() and self.cache_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def _quantize_cache(self, cache_tensor, layer_idx, is_key=True):
        quantized = super()._quantize_cache(cache_tensor, layer_idx, is_key)
        return quantized.view(torch.uint8) if self._as_bytes else quantized

    def _dequantize_cache(self, cache_tensor, layer_idx, is_key=True):
        if self._as_bytes:
            cache_tensor = cache_tensor.view(self.cache_dtype)
        return super()._dequantize_cache(cache_tensor, layer_idx, is_key)

    def get_cache(self, seq_len: int, skip_slice=False, kvcache_buffer=None, seq_ids=None, **kwargs):
        return [
            list(self.get_kv_by_layer_id(idx=idx, seq_len=seq_len, skip_slice=skip_slice,
                                         kvcache_buffer=kvcache_buffer, seq_ids=seq_ids, **kwargs))
            for idx in range(len(self.windows))
        ]

    def update_cache(self, is_for_context_encoding, seq_ids, position_ids, new_key_values, seq_len, **kwargs):
        """Write the producers' new K/V; returns [k, v] per cache slot, in slot order (what NxDI aliases)."""
        updated = []
        for idx in self.producers:
            updated.extend(self.update_kv_by_layer_id(
                idx=idx, is_for_context_encoding=is_for_context_encoding, seq_ids=seq_ids,
                position_ids=position_ids, kv_per_layer=new_key_values[idx], seq_len=seq_len, **kwargs,
            ))
        return [cache.view(self.cache_dtype) for cache in updated] if self._as_bytes else updated

    def get_kv_by_layer_id(self, idx, seq_len: int, skip_slice=False, kvcache_buffer=None, **kwargs):
        k_cache, v_cache = self._fetch_cache(idx, kvcache_buffer)
        if self.kv_cache_padding_size > 0:
            k_cache, v_cache = k_cache[: -self.kv_cache_padding_size], v_cache[: -self.kv_cache_padding_size]
        if self.windows[idx] is None and not skip_slice and seq_len < self.full_length:
            # A smaller bucket reads its prefix. At full length the spare slots (if any) stay: attention masks
            # them (slot >= max_length > position), where slicing them off makes the compiler copy the cache.
            k_cache, v_cache = k_cache[:, :, :seq_len], v_cache[:, :, :seq_len]
        return self._read(k_cache, v_cache, idx)

    def _read(self, k_cache: torch.Tensor, v_cache: torch.Tensor, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A quantized cache (`kv_cache_quant`) is dequantized where it is read (NxDI's _dequantize_cache)."""
        if not self.kv_quant_config:
            return k_cache, v_cache
        return self._dequantize_cache(k_cache, idx, is_key=True), self._dequantize_cache(v_cache, idx, is_key=False)

    def _rows(self, seq_ids: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """Cache row of each sequence of a context-encoding batch, int32 [B]: its seq_id under continuous
        batching, else rows 0..B-1 (NxDI fills them in order)."""
        if self.is_continuous_batching and seq_ids is not None:
            return seq_ids.reshape(-1).to(torch.int32)
        return torch.arange(batch, device=device, dtype=torch.int32)

    def prefill_prior(self, idx: int, seq_ids, batch: int, kvcache_buffer=None):
        """What a prompt chunk attends besides itself: its sequences' rows of layer idx's cache (the W-slot ring of
        a sliding layer; the max_length slots of a full layer, or None when a prompt always fits one chunk)."""
        if self.windows[idx] is None and not self.chunked_prefill:
            return None
        # A full layer's spare slots are cut off: attending them too (masked) widens every chunk's scores by the
        # spare length, which costs more than the slice (Gemma 3 1B geometry at 16384: temp arena 590 vs 573.5 MiB).
        k_cache, v_cache = self._fetch_cache(idx, kvcache_buffer)
        length = self.rings[idx] or self.full_length
        rows = k_cache.shape[0] - self.kv_cache_padding_size
        if batch == rows and not self.is_continuous_batching:
            return self._read(k_cache[:rows, :, :length], v_cache[:rows, :, :length], idx)  # in place
        index = self._rows(seq_ids, batch, k_cache.device)
        return self._read(k_cache.index_select(0, index)[:, :, :length], v_cache.index_select(0, index)[:, :, :length],
                          idx)

    def update_kv_by_layer_id(self, idx, is_for_context_encoding, seq_ids, position_ids, kv_per_layer, seq_len,
                              kvcache_buffer=None, **kwargs):
        """Token generation: NxDI's scatter at position (or position % W, `_get_index_to_update_new_position`).
        Context encoding (a prompt chunk): in the forms NxDI's own caches use, one dynamic-update-slice per
        sequence with int32 starts [row, 0, slot, 0] (NxDI's `dynamic_update_slice`, or `fill_prefix` for a
        whole ring of every row in order), updating the aliased cache in place."""
        if not is_for_context_encoding:
            return super().update_kv_by_layer_id(
                idx=idx, is_for_context_encoding=is_for_context_encoding, seq_ids=seq_ids, position_ids=position_ids,
                kv_per_layer=kv_per_layer, seq_len=seq_len, kvcache_buffer=kvcache_buffer, **kwargs,
            )
        k_cache, v_cache = self._fetch_cache(idx, kvcache_buffer)
        if self.kv_quant_config:  # quantized on write (NxDI's _quantize_cache; its token-generation path does too)
            kv_per_layer = (self._quantize_cache(kv_per_layer[0], idx, is_key=True),
                            self._quantize_cache(kv_per_layer[1], idx, is_key=False))
        batch = kv_per_layer[0].shape[0]
        rows = self._rows(seq_ids, batch, k_cache.device)
        positions = position_ids.to(torch.int32)
        first = positions[:, :1]
        # The chunk's last real position per sequence (-1: none); padding is False in `valid` ([B, C]).
        last = torch.where(self.state.valid, positions, -1).amax(dim=1, keepdim=True)
        zero = torch.zeros((), device=k_cache.device, dtype=torch.int32)
        window = self.rings[idx]  # the ring's size (the window, plus speculation's spare slots)
        if window is None:
            # Chunk token i goes to slot p0 + i. Padding after a sequence's last real token lands on slots no one
            # reads before they are written (attention sees slots < the query's position; decode writes its slot
            # first); a sequence with no real token in this chunk (its prompt ended earlier) writes into the spare
            # slots after max_length instead of over its cached tokens. So no cache slot is read here.
            start = torch.where(last >= first, first, self.full_length).reshape(-1)
            return [self._write_rows(cache, new, rows, start, zero)
                    for cache, new in zip((k_cache, v_cache), kv_per_layer, strict=True)]
        # Ring slot j ends holding the latest position <= last with p % W == j: from the chunk if that position is
        # in it, else unchanged. (last - j + W >= 0, so fmod is the modulo; one op, where torch.remainder's
        # sign handling is several.) The chunk may wrap the ring (C > W, or a chunk across slot W - 1).
        slot = torch.arange(window, device=k_cache.device, dtype=torch.int32)[None, :]
        held = last - torch.fmod(last - slot + window, window)
        source = torch.where(held >= first, window + held - first, slot)  # [B, W] into [ring, chunk], int32
        in_order = batch == k_cache.shape[0] - self.kv_cache_padding_size and not self.is_continuous_batching
        updated = []
        for cache, new in zip((k_cache, v_cache), kv_per_layer, strict=True):
            rings = []
            for r in range(batch):
                ring = cache[r:r + 1] if in_order else cache.index_select(0, rows[r:r + 1])
                merged = torch.cat([ring, new[r:r + 1]], dim=2)
                rings.append(merged.index_select(2, source[r]))
            if in_order:  # every row's whole ring, as NxDI writes a prefix
                updated.append(fill_prefix(cache, torch.cat(rings, dim=0)))
            else:
                updated.append(self._write_rows(cache, torch.cat(rings, dim=0), rows, zero.expand(batch), zero))
        return updated

    @staticmethod
    def _write_rows(cache: torch.Tensor, new: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                    zero: torch.Tensor) -> torch.Tensor:
        """new[r] into cache row rows[r] from slot slots[r] (int32 [B]): one dynamic-update-slice each."""
        for r in range(new.shape[0]):
            cache = dynamic_update_slice(cache, new[r:r + 1], [rows[r], zero, slots[r], zero])
        return cache

    def _get_index_to_update_new_position(self, seq_ids, scatter_index, position_ids, full_k, transposed, layer_idx):
        window = self.rings[layer_idx]
        if window is not None:
            position_ids = torch.fmod(position_ids, window)  # positions are >= 0: fmod is the modulo, one op
        return position_ids.view(-1, 1, position_ids.shape[-1], 1).expand_as(full_k)
