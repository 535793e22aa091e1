"""The names the command line offers (file formats, paper presets), free of heavy imports.

``multvae --help`` builds every subcommand's parser from these; the readers and the
preprocessing use the same definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# multvae.model.MODEL_KINDS, named here without importing torch (a test keeps them equal).
MODEL_KINDS = ("multvae", "multdae", "recvae")
FORMATS = ("ml-100k", "ml-1m", "ml-20m", "netflix", "msd", "filmtrust", "citeulike", "csv",
           "tsv", "parquet")
# Layout-identical releases read by the same code.
ALIASES = {"ml-10m": "ml-1m", "ml-25m": "ml-20m", "ml-latest": "ml-20m",
           "ml-latest-small": "ml-20m", "citeulike-t": "citeulike", "citeulike-a": "citeulike"}


@dataclass(frozen=True)
class Preprocessing:
    """Which rows count as clicks and which users/items are kept.

    ``min_rating``: keep rows whose value is strictly greater (the paper's > 3.5); None keeps
    every row. ``min_user_clicks``/``min_item_users``: drop users with fewer clicks / items
    with fewer distinct users; items are filtered first, then users, once (as the reference
    notebook does for MSD), so a few kept items may end up under their threshold.
    """

    min_rating: float | None = 3.5
    min_user_clicks: int = 5
    min_item_users: int = 0


@dataclass(frozen=True)
class Preset:
    """The paper's Table 1 recipe for one dataset: preprocessing plus held-out users per group."""

    preprocessing: Preprocessing
    n_heldout: int  # users in each of validation and test
    paper_epochs: int | None  # the paper's fixed schedule (Section 4.3); None: adaptive
    description: str = field(default="", compare=False)


PRESETS: dict[str, Preset] = {
    "ml-20m": Preset(Preprocessing(3.5, 5, 0), 10_000, 200,
                     "MovieLens-20M: ratings > 3.5, users >= 5, 10,000 held-out users"),
    "netflix": Preset(Preprocessing(3.5, 5, 0), 40_000, 100,
                      "Netflix Prize: ratings > 3.5, users >= 5, 40,000 held-out users"),
    "msd": Preset(Preprocessing(None, 20, 200), 50_000, 100,
                  "Million Song Dataset: songs >= 200 users, then users >= 20 songs, "
                  "50,000 held-out users"),
    # The small MovieLens sets under the published reference split (not in the paper).
    "ml-100k": Preset(Preprocessing(3.5, 5, 0), 100, None,
                      "MovieLens-100K: ratings > 3.5, users >= 5, 100 held-out users"),
    "ml-latest-small": Preset(Preprocessing(3.5, 5, 0), 50, None,
                              "ml-latest-small: ratings > 3.5, users >= 5, 50 held-out users"),
}
