"""Stand-in for openpi.shared.normalize: the NormStats record."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class NormStats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
