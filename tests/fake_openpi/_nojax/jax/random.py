"""jax.random stand-in: deterministic numpy generators keyed by a uint32 pair."""

import numpy as np


def key(seed: int) -> np.ndarray:
    return np.array([0, seed], np.uint32)


def split(k: np.ndarray, num: int = 2) -> np.ndarray:
    return np.random.default_rng(np.asarray(k).tolist()).integers(0, 2**32, (num, 2), dtype=np.uint32)


def normal(k: np.ndarray, shape: tuple[int, ...] = (), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(np.asarray(k).tolist()).standard_normal(shape).astype(dtype)
