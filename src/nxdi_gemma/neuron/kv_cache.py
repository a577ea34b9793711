"""Per-layer KV caches for Gemma on NxDI's KVCacheManager.

Overrides checked against NxDI 0.8 (cd3abf3) and 0.9 (c63afe0): KVCacheManager.__init__, _fetch_cache, get_cache,
update_cache, get_kv_by_layer_id, update_kv_by_layer_id, _get_index_to_update_new_position.
"""

from __future__ import annotations

import torch
from neuronx_distributed_inference.modules.kvcache.kv_cache_manager import KVCacheManager
from torch import nn

from .config import GemmaInferenceConfig


class GemmaKVCacheManager(KVCacheManager):
    """Per-layer cache shapes: full layers hold max_length slots (sliced to the bucket when read), sliding layers a
    ring of W slots written at position % W, each with its own KV heads and head dim."""

    def __init__(self, config: GemmaInferenceConfig, layers: nn.ModuleList, global_rank):
        plan = config.gemma_plan
        # The base allocates one cache per layer from this mapping; give it 1-slot stubs and build ours below.
        super().__init__(config, num_kv_head=config.num_key_value_heads, global_rank=global_rank,
                         layer_to_cache_size_mapping=[1] * plan.num_layers)
        batch = config.neuron_config.kv_cache_batch_size + config.neuron_config.kv_cache_padding_size
        self.windows = [layer.window for layer in plan.layers]
        self.producers = plan.kv_producers
        # KV-shared layers own no cache: they read their source layer's slot.
        slot = {index: n for n, index in enumerate(self.producers)}
        self.slot_of = [slot[layer.kv_source] for layer in plan.layers]
        self.k_shapes = self.v_shapes = [
            (batch, layers[i].self_attn.num_key_value_heads, plan.layers[i].window or config.neuron_config.max_length,
             plan.layers[i].head_dim)
            for i in self.producers
        ]
        self.past_key_values = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, dtype=self.cache_dtype), requires_grad=False)
            for shape in self.k_shapes for _ in ("k", "v")
        )

    def _fetch_cache(self, idx: int, kvcache_buffer=None):
        return super()._fetch_cache(self.slot_of[idx], kvcache_buffer)

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
        return updated

    def get_kv_by_layer_id(self, idx, seq_len: int, skip_slice=False, kvcache_buffer=None, **kwargs):
        k_cache, v_cache = self._fetch_cache(idx, kvcache_buffer)
        if self.kv_cache_padding_size > 0:
            k_cache, v_cache = k_cache[: -self.kv_cache_padding_size], v_cache[: -self.kv_cache_padding_size]
        if self.windows[idx] is None and not skip_slice:
            k_cache, v_cache = k_cache[:, :, :seq_len], v_cache[:, :, :seq_len]
        return k_cache, v_cache

    def update_kv_by_layer_id(self, idx, is_for_context_encoding, seq_ids, position_ids, kv_per_layer, seq_len,
                              **kwargs):
        window = self.windows[idx]
        if window is not None and is_for_context_encoding:
            kv_per_layer = tuple(ring_from_prefill(t, position_ids, window) for t in kv_per_layer)
        return super().update_kv_by_layer_id(
            idx=idx, is_for_context_encoding=is_for_context_encoding, seq_ids=seq_ids, position_ids=position_ids,
            kv_per_layer=kv_per_layer, seq_len=seq_len, **kwargs,
        )

    def _get_index_to_update_new_position(self, seq_ids, scatter_index, position_ids, full_k, transposed, layer_idx):
        window = self.windows[layer_idx]
        if window is not None:
            position_ids = position_ids % window
        return position_ids.view(-1, 1, position_ids.shape[-1], 1).expand_as(full_k)


def ring_from_prefill(kv: torch.Tensor, position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """The W-slot ring after a prefill: slot j holds the latest position p <= last with p % W == j.
    kv: [B, H, S, D] for positions 0..S-1 (right padded); returns [B, H, W, D] (slots past the prompt hold
    position 0's values and stay masked until written)."""
    last = position_ids.amax(dim=1, keepdim=True)  # [B, 1]
    slot = torch.arange(window, device=kv.device)[None, :]
    source = (last - torch.remainder(last - slot, window)).clamp(min=0)  # [B, W]
    index = source[:, None, :, None].expand(kv.shape[0], kv.shape[1], window, kv.shape[3])
    return torch.gather(kv, 2, index)


