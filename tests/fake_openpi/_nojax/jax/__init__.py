"""numpy stand-in for the few jax calls pi0remote's adapter and the fake openpi make (tests only)."""

from . import dtypes, numpy, random, tree  # noqa: F401


class _Device:
    platform = "cpu"
    device_kind = "stand-in cpu"


def devices() -> list[_Device]:
    return [_Device()]


def block_until_ready(x):
    return x


def device_put(x):
    return tree.map(lambda v: v, x)


def jit(f, **_):
    return lambda *a, **k: f(*a, **k)
