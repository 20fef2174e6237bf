"""A bounded cache of a frozen tower's outputs, keyed by the exact input token ids.

A locked (LiT) text tower is a fixed function: the same caption always gives the same features.
Caption sets built from class names and templates (the digits demo, CIFAR-10 shards with class
names as captions) repeat a few distinct captions over and over, so after the first batches the
tower need not run at all. Entries are kept in least-recently-used order up to ``max_entries``
rows (memory: ``max_entries x F x 4`` bytes in fp32, e.g. 32,768 x 384 = 48 MiB for MiniLM).

The cache is not checkpointed: it is a pure function of the frozen weights and the inputs, so a
resumed run rebuilds it on demand (entries computed in a batch of another length may differ from
the cached ones in the last bits of fp32, like any change of batch composition).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch


class FeatureCache:
    """LRU map from a row of token ids (without trailing padding) to a feature row ``(F,)``.

    Args:
        max_entries: most rows kept; 0 disables the cache (every lookup computes).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(0, int(max_entries))
        self._rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.lookups = 0  # rows asked for
        self.computed = 0  # rows the tower had to run for

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget every entry (the weights behind them changed)."""
        self._rows.clear()

    def take_counts(self) -> tuple[int, int]:
        """``(rows asked for, rows computed)`` since the last call; resets both."""
        counts = (self.lookups, self.computed)
        self.lookups = self.computed = 0
        return counts

    def get(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        compute: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Features of every row of ``ids`` ``(B, L)``, computing only rows not cached.

        Args:
            ids: token ids ``(B, L)`` (any device).
            lengths: ``(B,)`` real lengths (the key is ``ids[i, :lengths[i]]``).
            compute: ``(M, L) ids -> (M, F)`` for the rows that are missing (each distinct
                row once).

        Returns:
            ``(B, F)`` features, rows in the order of ``ids``.
        """
        rows = ids.cpu().numpy()
        lens = lengths.cpu().tolist()
        keys = [rows[i, : lens[i]].tobytes() for i in range(len(lens))]
        self.lookups += len(keys)
        missing: dict[bytes, int] = {}  # distinct uncached key -> its first row
        for i, k in enumerate(keys):
            if k in self._rows:
                self._rows.move_to_end(k)
            elif k not in missing:
                missing[k] = i
        self.computed += len(missing)
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            idx = torch.tensor(list(missing.values()), device=ids.device)
            feats = compute(ids[idx]).detach()  # (M, F)
            fresh = dict(zip(missing, feats))
            if self.max_entries:
                for k, v in fresh.items():
                    self._rows[k] = v
                while len(self._rows) > self.max_entries:
                    self._rows.popitem(last=False)
        return torch.stack([fresh[k] if k in fresh else self._rows[k] for k in keys])  # (B, F)
