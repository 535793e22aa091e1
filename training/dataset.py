"""Data types that flow through training: raw interactions and the strong-generalisation split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from multvae.items import ItemIndex


@dataclass
class Interactions:
    """Long-format interactions: row r says user ``user[r]`` clicked item ``item[r]``.

    ``user``/``item`` are int32 codes into ``user_ids``/``item_ids``, which keep the dataset's
    own ids in their own dtype (int64 when every id is numeric, so that "ascending user id"
    is numeric order, else str). Item codes follow the order of first appearance in the file.
    ``value`` is the rating or play count, or None for files that only list clicks.
    """

    user: NDArray[np.int32]
    item: NDArray[np.int32]
    value: NDArray[np.float32] | None
    user_ids: NDArray[Any]
    item_ids: NDArray[Any]
    source: str = ""
    titles: dict[str, str] = field(default_factory=dict)  # external item id -> title

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class HeldOut:
    """Validation or test users: 80 % of each history to fold in, 20 % held out as targets."""

    fold_in: sp.csr_matrix  # (n_users, I) binary
    targets: sp.csr_matrix  # (n_users, I) binary, every row has at least one item
    user_ids: NDArray[Any]  # external ids, row order

    @property
    def n_users(self) -> int:
        return int(self.fold_in.shape[0])


@dataclass
class Split:
    """Training users' full histories plus validation and test users under strong generalisation."""

    train: sp.csr_matrix  # (n_train_users, I) binary
    validation: HeldOut
    test: HeldOut
    items: ItemIndex  # column -> external id, popularity = clicks by training users
    seed: int
    stats: dict[str, int] = field(default_factory=dict)  # counts for the report (see split.py)

    @property
    def n_items(self) -> int:
        return int(self.train.shape[1])
