"""jax.dtypes stand-in: 32-bit canonical types, as jax without x64."""

import numpy as np

_CANON = {np.dtype(np.float64): np.dtype(np.float32), np.dtype(np.int64): np.dtype(np.int32)}


def canonicalize_dtype(dtype):
    return _CANON.get(np.dtype(dtype), np.dtype(dtype))
