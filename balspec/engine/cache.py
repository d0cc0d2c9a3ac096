"""KV storage owned by balspec: pre-allocated, written by position, rolled back in O(1).

One slot per attention layer: slots 0..N-1 are the trunk, the balconies come after (Exits.cache_slots).
HF decoder layers write into it through `update(key, value, layer_idx)`, the one method of transformers'
Cache interface they call; nothing is sliced-and-copied on rollback, a per-slot length moves back.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_slots, 1, num_kv_heads, max_len, head_dim)  # [slot, batch, kv_heads, position, head_dim]
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * num_slots  # host-side ints: reading a length never syncs the device
        self.max_len = max_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """Append [1, kv_heads, q, head_dim] at this slot's length; return all keys/values so far (views)."""
        start = self.lengths[layer_idx]
        end = start + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow in slot {layer_idx}: {end} > {self.max_len} positions")
        self.keys[layer_idx, :, :, start:end] = key_states
        self.values[layer_idx, :, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def rollback(self, slots, length: int) -> None:
        """Forget everything at positions >= length in these slots: O(1), the storage stays."""
        for slot in slots:
            if self.lengths[slot] > length:
                self.lengths[slot] = length

    def move(self, slots: range, source: int, target: int) -> None:
        """Copy the K/V at position `source` to position `target` in consecutive slots (an accepted tree row
        takes the place of the draft it replaces)."""
        index = slice(slots.start, slots.stop)
        self.keys[index, :, :, target] = self.keys[index, :, :, source]
        self.values[index, :, :, target] = self.values[index, :, :, source]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]


class StaticWrites:
    """The cache as a static-shape pass sees it (Engine with static_cache): K/V of the pass's rows are written at
    the cache indices `index` [rows] (a device tensor, so a captured graph replays at any position) and the
    layer attends over the whole storage, [1, kv_heads, max_len, head_dim], under a mask that hides every entry
    not yet valid for its row. The host-side lengths are not touched: masks, not lengths, decide what is seen."""

    def __init__(self, cache: KVCache, index: torch.Tensor):
        self.cache, self.index = cache, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs=None):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys.index_copy_(2, self.index, key_states)
        values.index_copy_(2, self.index, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.max_len
