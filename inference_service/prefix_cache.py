"""Keys and values of text heads kept across requests (causal LMs, the prompt after the text).

With the soft prompt after the text, a text's head (leading specials, anchor, the text before the prompt) is the
same prefix in every request that sends the text, round after round; only the prompt and the cue after it change.
Its keys and values depend on nothing else (causal attention), so they are computed once and reused, as vLLM's
automatic prefix caching does for token blocks. Entries are keyed by the head's token ids and the caller's salt
(the API key's id: one key's requests never learn, by timing, what another key sent), bounded in bytes and evicted
least recently used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

# Per layer, (keys, values), each [heads, length, head_dim].
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


def kv_bytes(kv: LayerKV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[LayerKV, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, salt: str, ids: tuple[int, ...]) -> LayerKV | None:
        key = (salt, ids)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, salt: str, ids: tuple[int, ...], kv: LayerKV) -> None:
        """Keep `kv` (its own storage: a slice of a batch's cache would pin the whole batch) unless it alone is
        larger than the cache; evict the least recently used entries until it fits."""
        size = kv_bytes(kv)
        if size > self.max_bytes:
            return
        key = (salt, ids)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
                self.evictions += 1
            self._entries[key] = (kv, size)
            self.bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
