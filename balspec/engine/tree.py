"""A draft-verify cycle's rows: the draft tree (a chain and its first position's siblings) and what a pass over
new rows needs besides their hidden states (rotary tables and masks per attention kind).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rows:
    """What a pass over new rows needs besides their hidden states, per attention kind (architecture.py):
    (rope, mask). rope: cos, sin [1, rows, head_dim] at the rows' positions; mask [1, 1, rows, cached + rows],
    boolean or additive as the layers take it (Engine._mask_format); None: each row sees everything cached."""

    views: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]]
    index: torch.Tensor | None = None  # static-shape passes: the rows' cache indices [rows] (cache.StaticWrites)


@dataclass(frozen=True)
class DraftTree:
    """One cycle's rows in cache order: the pending token t, the chain d_1..d_k, then width - 1 siblings
    of d_1 (other candidates for the first position). A row sees its ancestors and itself."""

    k: int
    width: int
    depth: torch.Tensor  # [rows] position offset from t
    allowed: torch.Tensor  # bool [rows, rows]: allowed[i, j] when row j is row i or one of its ancestors

    @property
    def size(self) -> int:
        return 1 + self.k + self.width - 1

    @staticmethod
    def build(k: int, width: int, device) -> "DraftTree":
        parents = [-1] + list(range(k)) + [0] * (width - 1)  # d_i's parent is row i - 1; siblings hang off t
        depth = [0] + list(range(1, k + 1)) + [1] * (width - 1)
        allowed = torch.zeros(len(parents), len(parents), dtype=torch.bool)
        for row in range(len(parents)):
            node = row
            while node >= 0:
                allowed[row, node] = True
                node = parents[node]
        return DraftTree(k, width, torch.tensor(depth, device=device), allowed.to(device))
