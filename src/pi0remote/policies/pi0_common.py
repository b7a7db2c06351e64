"""What every π₀ policy shares: openpi's import (with its install hint), metadata, validation, batch helpers.

The three ways to serve π₀ live beside this module: ``pi0_fast`` (the default checkpoint engine: one jitted
function per padded batch size), ``pi0_checkpoint`` (``--exact``: openpi's own ``Policy.infer`` steps, and the
checkpoint loader both paths use) and ``pi0_random`` (``--random-weights``). ``pi0`` builds one of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .base import CANONICAL_INPUT_SPEC, PolicyMetadata, validate_obs

logger = logging.getLogger("pi0remote.pi0")

OPENPI_COMMIT = "15a9616a00943ada6c20a0f158e3adb39df2ccac"
"""The openpi commit this adapter was written and measured against (docs/pi0.md pins installs to it)."""

OPENPI_GIT = "https://github.com/Physical-Intelligence/openpi"
DEFAULT_CONFIG = "pi0_aloha_sim"
DEFAULT_CHECKPOINT_BASE = "gs://openpi-assets/checkpoints/"
ALOHA_ACTION_DIM = 14
OPTIONAL_CAMERAS = ("cam_low", "cam_left_wrist", "cam_right_wrist")
"""Extra ALOHA cameras passed on to openpi when a request carries them (CHW uint8, like ``cam_high``)."""

RANDOM_PROMPT_TOKENS: tuple[int, ...] = (2, 14103, 28660, 108)
"""Fixed PaliGemma token ids used with random weights (BOS, two word pieces, the newline that ends a π₀ prompt);
the rest of the 48-token prompt window is padding, as with a short real prompt."""

INSTALL_HINT = (
    "The 'pi0' policy needs openpi, which is not on the package index (the 'openpi' name there is an empty "
    "placeholder). Install it from its git repository at the commit pi0remote is tested with, in Python >= 3.11:\n"
    f'    GIT_LFS_SKIP_SMUDGE=1 pip install "openpi @ git+{OPENPI_GIT}@{OPENPI_COMMIT}" '
    f'"openpi-client @ git+{OPENPI_GIT}@{OPENPI_COMMIT}#subdirectory=packages/openpi-client"\n'
    f"or clone it, check out {OPENPI_COMMIT} and follow its README (GIT_LFS_SKIP_SMUDGE=1 uv sync), then install "
    "pi0remote into that environment. See docs/pi0.md."
)


COMPILE_CACHE_ENV = "PI0REMOTE_JAX_CACHE"
"""A directory for jax's persistent compilation cache, or ``off``; unset: ``~/.cache/pi0remote/jax``."""


def use_compile_cache(environ: Mapping[str, str] = os.environ) -> str | None:
    """Turn on jax's persistent compilation cache before π₀ compiles anything; returns its directory or None.

    A fast-path warm-up compiles ~8 programs (about 150 s on an H200); with the cache, a restart of the same
    model and jax takes seconds. ``JAX_COMPILATION_CACHE_DIR`` (jax's own setting) wins when set;
    ``PI0REMOTE_JAX_CACHE=off`` leaves the cache off.
    """
    try:
        import jax
    except ImportError:  # openpi's own import then says what is missing
        return None
    config = getattr(jax, "config", None)  # None: the test suite's numpy stand-in
    if config is None:
        return None
    current = config.jax_compilation_cache_dir
    if current:
        return str(current)
    setting = environ.get(COMPILE_CACHE_ENV, "").strip()
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = setting or os.path.join(base, "pi0remote", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        logger.warning("pi0: no compilation cache (%s: %s)", path, exc)
        return None
    config.update("jax_compilation_cache_dir", path)
    return path


class OpenpiNotInstalledError(ImportError):
    """openpi (or one of its own dependencies) cannot be imported; the message says how to install it."""


# --------------------------------------------------------------------------------------------------------------
# openpi imports


def _import_openpi(*modules: str) -> list[types.ModuleType]:
    """Import openpi modules, turning a missing openpi into :class:`OpenpiNotInstalledError`."""
    try:
        found = importlib.util.find_spec("openpi") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise OpenpiNotInstalledError(INSTALL_HINT + "\n(import failed: no module named 'openpi')")
    _prepare_pytorch_module()
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise OpenpiNotInstalledError(f"{INSTALL_HINT}\n(import failed: {exc})") from exc


def _prepare_pytorch_module() -> None:
    """Let openpi's serving path import where two of its training-side imports cannot.

    ``openpi.models.model`` imports openpi's PyTorch port (``openpi.models_pytorch.pi0_pytorch``, which needs the
    exact transformers openpi pins), and ``openpi.policies.policy_config`` imports LeRobot's dataset module through
    openpi's training data loader. Serving a JAX checkpoint uses neither. A real install imports them normally;
    only when an import fails (say, openpi's source on ``sys.path`` next to a newer transformers and no LeRobot)
    is a stand-in registered, whose attributes raise an ImportError that says why (so a PyTorch checkpoint, or
    training, still fails clearly).
    """
    _stand_in("openpi.models_pytorch.pi0_pytorch", "openpi's PyTorch model", "only JAX checkpoints load")
    _stand_in("lerobot.common.datasets.lerobot_dataset", "LeRobot's dataset module", "serving only")


def _stand_in(name: str, what: str, consequence: str) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except Exception as exc:  # noqa: BLE001 - any failure of that optional module
        reason = f"{type(exc).__name__}: {exc}"
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:i])
        if mod_name in sys.modules and sys.modules[mod_name] is not None and i < len(parts):
            continue
        try:
            if i < len(parts):
                importlib.import_module(mod_name)
                continue
        except Exception:  # noqa: BLE001 - the package itself is missing: stand in for it too
            pass
        stub = types.ModuleType(
            mod_name, f"Stand-in registered by pi0remote ({what} failed to import: {reason})."
        )
        if i < len(parts):
            stub.__path__ = []  # type: ignore[attr-defined]
        else:

            def __getattr__(attr: str) -> Any:  # noqa: N807
                if attr.startswith("__"):
                    raise AttributeError(attr)
                raise ImportError(f"{what} is unavailable here ({reason}); {consequence}")

            stub.__getattr__ = __getattr__  # type: ignore[attr-defined]
        sys.modules[mod_name] = stub
        if i > 1:
            setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], stub)
    logger.warning("%s could not be imported (%s); %s", what, reason, consequence)


def _device_name(jax: Any) -> str:
    try:
        dev = jax.devices()[0]
        return str(getattr(dev, "device_kind", None) or dev.platform)
    except Exception:  # noqa: BLE001
        return "unknown"


def _bucket(n: int) -> int:
    """Batch sizes are padded up to a power of two so that a server batching any count compiles few shapes."""
    b = 1
    while b < n:
        b *= 2
    return b


def _ms(t0: float, t1: float) -> float:
    return (t1 - t0) * 1000.0


def _prompt_of(obs: Mapping[str, Any]) -> str | None:
    p = obs.get("prompt")
    if p is None:
        return None
    if isinstance(p, bytes):
        return p.decode()
    if isinstance(p, np.ndarray):
        return str(p.item())
    return str(p)


class _Pi0Base:
    """What both π₀ policies share: metadata, validation, the batch entry points."""

    name = "pi0"
    inline = False

    def __init__(self, extra: dict[str, Any], action_horizon: int) -> None:
        self.action_horizon = action_horizon
        self.metadata = PolicyMetadata(
            name=self.name,
            input_spec=dict(CANONICAL_INPUT_SPEC),
            action_shape=(action_horizon, ALOHA_ACTION_DIM),
            action_horizon=action_horizon,
            extra=extra,
        )
        self._lock = threading.Lock()
        self.resets = 0
        self.warmup_batch_sizes: tuple[int, ...] = (1,)

    def set_max_batch(self, max_batch: int | None) -> None:
        """Make ``warmup()`` compile every padded batch size up to ``max_batch`` (1, 2, 4, ...), so that a server
        batching concurrent requests never compiles while serving."""
        top = _bucket(max(1, int(max_batch or 1)))
        self.warmup_batch_sizes = tuple(1 << i for i in range(top.bit_length()))

    def reset(self) -> None:
        """π₀ keeps no per-episode state (each call maps one observation to one chunk)."""
        self.resets += 1

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        return self.infer_batch([obs])[0]

    def infer_batch(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    @staticmethod
    def _reply(action: np.ndarray, pre: float, dev: float, post: float) -> dict[str, Any]:
        return {
            "action": action,
            "inference_ms": dev,
            "policy_timing": {"preprocess_ms": pre, "device_ms": dev, "postprocess_ms": post},
        }

    def _validate(self, obs: Any) -> None:
        """The canonical pair, plus any extra camera a request carries: CHW uint8 like ``cam_high``; ``rtc``
        only where the metadata declares it (never silently unguided)."""
        from ..rtc import check_supported

        validate_obs(obs, CANONICAL_INPUT_SPEC)
        check_supported(obs, self.metadata.extra)
        for cam in OPTIONAL_CAMERAS:
            img = obs.get(cam)
            if img is None:
                continue
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[0] != 3:
                got = f"{img.dtype} {list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
                raise InvalidInputError(f"{cam!r}: expected a uint8 [3, H, W] image, got {got}")

    def _dummy_obs(self) -> dict[str, Any]:
        return {
            "cam_high": np.zeros((3, 224, 224), np.uint8),
            "state": np.zeros((ALOHA_ACTION_DIM,), np.float32),
        }
