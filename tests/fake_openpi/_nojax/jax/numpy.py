"""jax.numpy stand-in: plain numpy."""

from numpy import *  # noqa: F403
from numpy import asarray, concatenate, float32, uint8, zeros  # noqa: F401
