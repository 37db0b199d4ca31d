"""The point and label definitions, re-exported from `lit_spine.task` where they now live.

They moved out of `data/` so that `models/` can use them without importing the data layer
(see docs/architecture.md); this module keeps `lit_spine.data.labels` imports working.
"""

from lit_spine.task import (
    DISC_POINTS,
    NUM_POINTS,
    POINT_INDEX,
    POINT_NAMES,
    VERTEBRA_POINTS,
    VOCABULARIES,
    Vocabulary,
    get_vocabulary,
    is_disc,
    point_type,
)

__all__ = [
    "DISC_POINTS",
    "NUM_POINTS",
    "POINT_INDEX",
    "POINT_NAMES",
    "VERTEBRA_POINTS",
    "VOCABULARIES",
    "Vocabulary",
    "get_vocabulary",
    "is_disc",
    "point_type",
]
