"""The ``pi0`` policy: Physical Intelligence's π₀ through openpi, with honest GPU timing.

Two ways to build it (``load_policy("pi0", **options)`` calls :func:`make_pi0_policy`):

* **checkpoint** (default): openpi's own ``get_config(config)`` and
  ``policy_config.create_trained_policy(...)`` load ``gs://openpi-assets/checkpoints/pi0_aloha_sim`` (or a local
  path / other URL), so every transform (ALOHA inputs, normalization, tokenizer, output transforms) is openpi's and
  the actions are exactly those of openpi's ``Policy.infer``. This module only re-times that call in three parts.
* **random weights** (``random_weights=True``): the same π₀ model (``Pi0Config().create(...)``, floating parameters
  cast to bfloat16 as served checkpoints are), its real ``sample_actions``, fixed prompt token ids, no checkpoint and
  no tokenizer download. Meant for measuring latency where nothing can be downloaded.

Timing: ``inference_ms`` (= ``policy_timing["device_ms"]``) runs from the model call until the action chunk is a
host numpy array, so it is real compute time, not JAX dispatch time. ``preprocess_ms`` is host work before the call
(validation, openpi input transforms, batching); ``postprocess_ms`` is host work after it (output transforms).

openpi is not on the package index; see ``docs/pi0.md`` and :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .base import CANONICAL_INPUT_SPEC, PolicyMetadata, validate_obs

__all__ = [
    "DEFAULT_CHECKPOINT_BASE",
    "DEFAULT_CONFIG",
    "INSTALL_HINT",
    "OPENPI_COMMIT",
    "OpenpiNotInstalledError",
    "OpenpiPi0Policy",
    "RANDOM_PROMPT_TOKENS",
    "RandomWeightsPi0Policy",
    "make_pi0_policy",
]

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
    """Let ``openpi.models.model`` import when openpi's PyTorch port cannot.

    ``openpi.models.model`` imports ``openpi.models_pytorch.pi0_pytorch``, which needs the exact transformers
    version openpi pins. The JAX model never uses it. A real install imports it normally; only when that import
    fails (say, openpi source on ``sys.path`` next to a newer transformers) is a stand-in registered, whose
    attributes raise an ImportError that says why (so a PyTorch checkpoint still fails clearly).
    """
    name = "openpi.models_pytorch.pi0_pytorch"
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except Exception as exc:  # noqa: BLE001 - any failure of that optional module
        reason = f"{type(exc).__name__}: {exc}"
    sys.modules.pop(name, None)
    stub = types.ModuleType(
        name, f"Stand-in registered by pi0remote; the real module failed to import ({reason})."
    )

    def __getattr__(attr: str) -> Any:  # noqa: N807
        raise ImportError(f"openpi's PyTorch model is unavailable here ({reason}); only JAX checkpoints load")

    stub.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[name] = stub
    logger.warning("openpi's PyTorch model could not be imported (%s); JAX model only", reason)


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

    def _dummy_obs(self) -> dict[str, Any]:
        return {
            "cam_high": np.zeros((3, 224, 224), np.uint8),
            "state": np.zeros((ALOHA_ACTION_DIM,), np.float32),
        }


# --------------------------------------------------------------------------------------------------------------
# checkpoint path: openpi's own policy


class OpenpiPi0Policy(_Pi0Base):
    """Wraps an ``openpi.policies.policy.Policy``; actions are exactly what its ``infer`` returns.

    ``infer`` runs the same steps as openpi's ``Policy.infer`` (input transforms, batch of one, one split of the
    policy's rng, its jitted ``sample_actions``, host copy, output transforms), timing the three parts; the model
    part ends once the result is a numpy array. Where the policy lacks those parts (openpi's PyTorch policies, or a
    future openpi), it calls ``Policy.infer`` itself and times it whole.

    ``infer_batch`` transforms each observation with openpi's transforms, stacks them (padded to a power of two) and
    makes one ``sample_actions`` call. Each item gets the noise that sequential ``infer`` calls would have drawn
    from the policy's rng, so item i equals the i-th of n sequential calls up to floating-point differences of
    batched kernels.

    ``fast_host`` (default) moves the transformed inputs to the device in one ``device_put`` instead of one
    ``jnp.asarray`` per leaf; the bytes are the same and the actions stay bit-identical to ``Policy.infer``'s.
    """

    def __init__(
        self,
        openpi_policy: Any,
        *,
        extra: dict[str, Any],
        default_prompt: str | None = None,
        fast_host: bool = True,
    ) -> None:
        model = getattr(openpi_policy, "_model", None)
        horizon = int(getattr(model, "action_horizon", 50))
        super().__init__(extra, horizon)
        self.openpi_policy = openpi_policy
        self._default_prompt = default_prompt
        p = openpi_policy
        self._split = not getattr(p, "_is_pytorch_model", False) and all(
            hasattr(p, a) for a in ("_input_transform", "_output_transform", "_sample_actions", "_rng")
        )
        (jax,) = _import_openpi("jax")
        self._jax = jax
        self._jnp = importlib.import_module("jax.numpy")
        (self._model_mod,) = _import_openpi("openpi.models.model")
        self.metadata.extra.setdefault("device", _device_name(jax))
        self.metadata.extra["timing_split"] = self._split
        self.fast_host = fast_host
        self.metadata.extra["fast_host"] = fast_host

    def _to_device(self, host: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Batched host inputs -> (device inputs, openpi Observation), with values identical to openpi's path.

        openpi puts each leaf on the device with its own ``jnp.asarray`` (and adds the batch axis there). With
        ``fast_host`` the leaves go in one ``device_put`` after the same host-side dtype canonicalization
        ``jnp.asarray`` applies: the same bytes arrive, ~2.5 ms sooner on an H200. Converting the uint8 images
        inside a compiled function as well was tried and is not bit-identical to openpi's eager conversion on
        an H200, so ``Observation.from_dict`` (openpi's) still converts them.
        """
        jax = self._jax
        if not self.fast_host:
            dev = jax.tree.map(self._jnp.asarray, host)
        else:
            canon = jax.dtypes.canonicalize_dtype
            dev = jax.device_put(
                jax.tree.map(lambda x: np.asarray(x, dtype=canon(np.asarray(x).dtype)), host)
            )
        return dev, self._model_mod.Observation.from_dict(dev)

    @classmethod
    def from_config(
        cls, *, config: str, checkpoint: str, num_steps: int, prompt: str | None
    ) -> OpenpiPi0Policy:
        config_mod, policy_config = _import_openpi("openpi.training.config", "openpi.policies.policy_config")
        train_config = config_mod.get_config(config)
        # openpi's default (10 steps) is left implicit, so that the jitted call is the very one openpi serves.
        sample_kwargs = None if num_steps == 10 else {"num_steps": num_steps}
        t0 = time.perf_counter()
        policy = policy_config.create_trained_policy(
            train_config, checkpoint, default_prompt=prompt, sample_kwargs=sample_kwargs
        )
        load_s = time.perf_counter() - t0
        extra = {
            "config": config,
            "checkpoint": checkpoint,
            "num_steps": num_steps,
            "random_weights": False,
            "prompt": prompt,
            "load_s": round(load_s, 3),
            "openpi_commit": OPENPI_COMMIT,
        }
        return cls(policy, extra=extra, default_prompt=prompt)

    # -- the openpi input -----------------------------------------------------------------------------------

    @staticmethod
    def to_openpi(obs: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical request -> openpi's ALOHA input: ``images.cam_high`` (CHW uint8), ``state``, ``prompt``."""
        images = {"cam_high": obs["cam_high"]}
        for cam in OPTIONAL_CAMERAS:
            if isinstance(obs.get(cam), np.ndarray):
                images[cam] = obs[cam]
        out: dict[str, Any] = {"images": images, "state": obs["state"]}
        prompt = _prompt_of(obs)
        if prompt is not None:
            out["prompt"] = prompt
        return out

    @staticmethod
    def _copy_tree(x: Any) -> Any:
        # jax.tree.map(lambda x: x, obs) in openpi: new containers, same leaves (transforms may mutate dicts).
        if isinstance(x, dict):
            return {k: OpenpiPi0Policy._copy_tree(v) for k, v in x.items()}
        if isinstance(x, list):
            return [OpenpiPi0Policy._copy_tree(v) for v in x]
        return x

    # -- inference ------------------------------------------------------------------------------------------

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        validate_obs(obs, CANONICAL_INPUT_SPEC)
        data = self.to_openpi(obs)
        with self._lock:
            if not self._split:
                t1 = time.perf_counter()
                out = self.openpi_policy.infer(data)
                action = np.asarray(out["actions"], dtype=np.float32)
                t2 = time.perf_counter()
                return self._reply(action, _ms(t0, t1), _ms(t1, t2), 0.0)
            jax, jnp, p = self._jax, self._jnp, self.openpi_policy
            inputs = p._input_transform(self._copy_tree(data))
            if self.fast_host:
                inputs, observation = self._to_device(
                    jax.tree.map(lambda x: np.asarray(x)[np.newaxis, ...], inputs)
                )
            else:  # openpi's own steps, verbatim
                inputs = jax.tree.map(lambda x: jnp.asarray(x)[np.newaxis, ...], inputs)
                observation = self._model_mod.Observation.from_dict(inputs)
            p._rng, sample_rng = jax.random.split(p._rng)
            t1 = time.perf_counter()
            outputs = {
                "state": inputs["state"],
                "actions": p._sample_actions(sample_rng, observation, **p._sample_kwargs),
            }
            outputs = jax.tree.map(lambda x: np.asarray(x[0, ...]), outputs)  # blocks until ready
            t2 = time.perf_counter()
        outputs = p._output_transform(outputs)
        action = np.ascontiguousarray(outputs["actions"], dtype=np.float32)
        t3 = time.perf_counter()
        return self._reply(action, _ms(t0, t1), _ms(t1, t2), _ms(t2, t3))

    def infer_batch(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        n = len(batch)
        if n == 0:
            return []
        if n == 1 or not self._split:
            return [self.infer(obs) for obs in batch]
        t0 = time.perf_counter()
        for obs in batch:
            validate_obs(obs, CANONICAL_INPUT_SPEC)
        jax, jnp, p = self._jax, self._jnp, self.openpi_policy
        items = [p._input_transform(self._copy_tree(self.to_openpi(obs))) for obs in batch]
        size = _bucket(n)
        items += [items[-1]] * (size - n)
        host = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)
        model = p._model
        shape = (1, int(model.action_horizon), int(model.action_dim))
        with self._lock:
            noises = []
            for _ in range(n):
                p._rng, sample_rng = jax.random.split(p._rng)
                noises.append(jax.random.normal(sample_rng, shape))
            noises += [jnp.zeros(shape, jnp.float32)] * (size - n)
            noise = jnp.concatenate(noises, axis=0)
            stacked, observation = self._to_device(host)
            t1 = time.perf_counter()
            actions = p._sample_actions(sample_rng, observation, **p._sample_kwargs, noise=noise)
            actions = np.asarray(actions)  # blocks until ready
            t2 = time.perf_counter()
        states = np.asarray(stacked["state"])
        replies = []
        for i in range(n):
            out = p._output_transform({"state": states[i], "actions": actions[i]})
            replies.append(np.ascontiguousarray(out["actions"], dtype=np.float32))
        t3 = time.perf_counter()
        pre, dev, post = _ms(t0, t1), _ms(t1, t2), _ms(t2, t3)
        return [self._reply(a, pre, dev, post) for a in replies]

    def warmup(self) -> None:
        """Compile (first call) and run once more, then put the rng back so that warm-up draws no noise."""
        rng = getattr(self.openpi_policy, "_rng", None)
        obs = self._dummy_obs()
        if self._default_prompt is None:
            obs["prompt"] = "warm up"
        t0 = time.perf_counter()
        self.infer(obs)
        t1 = time.perf_counter()
        self.infer(obs)
        t2 = time.perf_counter()
        for b in self.warmup_batch_sizes:
            if b > 1:
                self.infer_batch([obs] * b)
        if rng is not None:
            self.openpi_policy._rng = rng
        self.metadata.extra["compile_s"] = round(max(0.0, (t1 - t0) - (t2 - t1)), 3)
        self.metadata.extra["warmup_s"] = round(time.perf_counter() - t0, 3)


# --------------------------------------------------------------------------------------------------------------
# random-weights path


def _cast_floating(jax: Any, jnp: Any, state: Any, dtype: Any) -> Any:
    """Cast every floating parameter to ``dtype`` (openpi restores served checkpoints as bfloat16)."""

    def cast(x: Any) -> Any:
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    try:
        state = jax.tree.map(cast, state)
    except (AttributeError, TypeError):  # a flax whose State leaves are not plain arrays
        pure = jax.tree.map(cast, state.to_pure_dict())
        state.replace_by_pure_dict(pure)
    jax.block_until_ready(jax.tree.leaves(state))
    return state


@contextlib.contextmanager
def _image_keys_while_tracing(model_mod: Any, keys: tuple[str, ...]) -> Iterator[None]:
    """While tracing, let openpi's ``preprocess_observation`` keep only ``keys``.

    π₀'s ``sample_actions`` always embeds the three ALOHA image slots; slots whose mask is False (no such camera)
    are attended by nothing, so dropping them from the prefix gives the same attention result with a third of the
    image tokens. Only the trace sees the patch: the compiled function holds no reference to it.
    """
    original = model_mod.preprocess_observation
    model_mod.preprocess_observation = functools.partial(original, image_keys=keys)
    try:
        yield
    finally:
        model_mod.preprocess_observation = original


class RandomWeightsPi0Policy(_Pi0Base):
    """π₀ with random bfloat16 weights: openpi's model and ``sample_actions``, no checkpoint, fixed prompt ids.

    The request's ``cam_high`` goes to the device as CHW uint8 and is converted inside the compiled function; the
    state is zero-padded to the model's 32 dims; the reply is the first 14 dims of the 50-step chunk. There are no
    normalization statistics and no tokenizer: the actions are meaningless, the compute is π₀'s.

    ``image_slots=1`` (default) embeds only the real camera; ``image_slots=3`` embeds openpi's three ALOHA slots
    (two of them masked), which is what the checkpoint path computes for a one-camera request.
    """

    def __init__(
        self,
        *,
        config: str = DEFAULT_CONFIG,
        num_steps: int = 10,
        prompt: str | None = None,
        seed: int = 0,
        image_slots: int = 1,
        weights: tuple[Any, Any, Any] | None = None,
    ) -> None:
        if image_slots not in (1, 3):
            raise ValueError(f"image_slots must be 1 or 3, got {image_slots}")
        self._jax, nnx, self._model_mod = _import_openpi("jax", "flax.nnx", "openpi.models.model")
        jax = self._jax
        jnp = importlib.import_module("jax.numpy")
        t0 = time.perf_counter()
        if weights is None:
            model_config = self._model_config(config)
            model = model_config.create(jax.random.key(seed))
            graphdef, state = nnx.split(model)
            del model
            state = _cast_floating(jax, jnp, state, jnp.bfloat16)
            weights = (model_config, graphdef, state)
        build_s = time.perf_counter() - t0
        self.weights = weights
        model_config, graphdef, state = weights
        self._state = state
        super().__init__(
            {
                "config": config,
                "checkpoint": None,
                "num_steps": num_steps,
                "random_weights": True,
                "prompt": prompt,
                "prompt_token_ids": list(RANDOM_PROMPT_TOKENS),
                "prefix_image_slots": image_slots,
                "device": _device_name(jax),
                "build_s": round(build_s, 3),
                "openpi_commit": OPENPI_COMMIT,
            },
            int(model_config.action_horizon),
        )
        self.num_steps = num_steps
        self.image_slots = image_slots
        self._keys = ("base_0_rgb",) if image_slots == 1 else tuple(self._model_mod.IMAGE_KEYS)
        max_len = int(model_config.max_token_len)
        tokens = np.zeros((1, max_len), np.int32)
        tokens[0, : len(RANDOM_PROMPT_TOKENS)] = RANDOM_PROMPT_TOKENS
        mask = np.zeros((1, max_len), bool)
        mask[0, : len(RANDOM_PROMPT_TOKENS)] = True
        self._tokens = jnp.asarray(tokens)
        self._token_mask = jnp.asarray(mask)
        self._rng = jax.random.key(seed)
        action_dim = int(model_config.action_dim)
        model_mod = self._model_mod
        keys = self._keys

        def forward(state, rng, cam, robot_state, tokens, token_mask):  # noqa: ANN001 - traced
            model = nnx.merge(graphdef, state)
            b = cam.shape[0]
            img = jnp.transpose(cam, (0, 2, 3, 1)).astype(jnp.float32) / 255.0 * 2.0 - 1.0
            images = {k: img if k == "base_0_rgb" else jnp.full_like(img, -1.0) for k in keys}
            masks = {k: jnp.full((b,), k == "base_0_rgb") for k in keys}
            obs = model_mod.Observation(
                images=images,
                image_masks=masks,
                state=jnp.pad(robot_state, ((0, 0), (0, action_dim - robot_state.shape[-1]))),
                tokenized_prompt=jnp.broadcast_to(tokens, (b, tokens.shape[-1])),
                tokenized_prompt_mask=jnp.broadcast_to(token_mask, (b, token_mask.shape[-1])),
            )
            rng, sample_rng = jax.random.split(rng)
            actions = model.sample_actions(sample_rng, obs, num_steps=num_steps)
            return actions[:, :, :ALOHA_ACTION_DIM], rng

        self._jitted = jax.jit(forward)
        self._compiled: dict[int, Any] = {}
        self.compile_s: dict[int, float] = {}

    @staticmethod
    def _model_config(config: str) -> Any:
        if config == DEFAULT_CONFIG:
            (pi0_config,) = _import_openpi("openpi.models.pi0_config")
            return pi0_config.Pi0Config()
        (config_mod,) = _import_openpi("openpi.training.config")
        return config_mod.get_config(config).model

    def compile(self, batch_size: int) -> float:
        """Compile the forward pass for one (padded) batch size; returns seconds spent."""
        if batch_size in self._compiled:
            return 0.0
        jnp = importlib.import_module("jax.numpy")
        t0 = time.perf_counter()
        args = (
            self._state,
            self._rng,
            jnp.zeros((batch_size, 3, 224, 224), jnp.uint8),
            jnp.zeros((batch_size, ALOHA_ACTION_DIM), jnp.float32),
            self._tokens,
            self._token_mask,
        )
        if self.image_slots == 1:
            with _image_keys_while_tracing(self._model_mod, self._keys):
                lowered = self._jitted.lower(*args)
        else:
            lowered = self._jitted.lower(*args)
        self._compiled[batch_size] = lowered.compile()
        secs = time.perf_counter() - t0
        self.compile_s[batch_size] = round(secs, 3)
        self.metadata.extra["compile_s_by_batch"] = {str(k): v for k, v in sorted(self.compile_s.items())}
        logger.info("pi0 random weights: compiled batch %d in %.1f s", batch_size, secs)
        return secs

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Compile the given batch sizes (default: ``warmup_batch_sizes``, batch 1 alone) and run each once."""
        t0 = time.perf_counter()
        for b in batch_sizes or self.warmup_batch_sizes:
            self.compile(_bucket(b))
            self.infer_batch([self._dummy_obs()] * b)
        self.metadata.extra["compile_s"] = self.compile_s.get(1, next(iter(self.compile_s.values()), 0.0))
        self.metadata.extra["warmup_s"] = round(time.perf_counter() - t0, 3)

    def infer_batch(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        n = len(batch)
        if n == 0:
            return []
        t0 = time.perf_counter()
        for obs in batch:
            validate_obs(obs, CANONICAL_INPUT_SPEC)
        size = _bucket(n)
        if n == 1:
            cam = batch[0]["cam_high"][np.newaxis]
            state = batch[0]["state"][np.newaxis]
        else:
            rows = list(batch) + [batch[-1]] * (size - n)
            cam = np.stack([o["cam_high"] for o in rows])
            state = np.stack([o["state"] for o in rows])
        with self._lock:
            compiled = self._compiled.get(size)
            if compiled is None:
                self.compile(size)
                compiled = self._compiled[size]
                t0 = time.perf_counter()
            t1 = time.perf_counter()
            out, self._rng = compiled(self._state, self._rng, cam, state, self._tokens, self._token_mask)
            actions = np.asarray(out)  # blocks until the result is on the host
            t2 = time.perf_counter()
        replies = [actions[i] for i in range(n)]
        t3 = time.perf_counter()
        pre, dev, post = _ms(t0, t1), _ms(t1, t2), _ms(t2, t3)
        return [self._reply(a, pre, dev, post) for a in replies]


# --------------------------------------------------------------------------------------------------------------


def make_pi0_policy(
    *,
    config: str | None = DEFAULT_CONFIG,
    checkpoint: str | None = None,
    random_weights: bool = False,
    num_steps: int | None = 10,
    prompt: str | None = None,
    **options: Any,
) -> OpenpiPi0Policy | RandomWeightsPi0Policy:
    """Build the ``pi0`` policy (``python -m pi0remote.serve --policy pi0 ...``).

    ``config``: openpi training config name (``pi0_aloha_sim``). ``checkpoint``: local path or ``gs://`` URL
    (default ``gs://openpi-assets/checkpoints/<config>``, cached by openpi under ``$OPENPI_DATA_HOME``,
    ``~/.cache/openpi`` by default). ``random_weights``: same model, random bf16 weights, fixed prompt ids.
    ``num_steps``: flow-matching steps. ``prompt``: default prompt when a request carries none.
    ``max_batch``: the server's batch limit; ``warmup()`` then compiles every padded size up to it.
    Other options are ignored, except ``seed`` and ``image_slots`` for random weights.
    """
    config = config or DEFAULT_CONFIG
    num_steps = 10 if num_steps is None else int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if random_weights:
        if checkpoint:
            logger.warning("pi0: --random-weights given, ignoring checkpoint %s", checkpoint)
        policy: OpenpiPi0Policy | RandomWeightsPi0Policy = RandomWeightsPi0Policy(
            config=config,
            num_steps=num_steps,
            prompt=prompt,
            seed=int(options.get("seed") or 0),
            image_slots=int(options.get("image_slots") or 1),
        )
    else:
        checkpoint = checkpoint or DEFAULT_CHECKPOINT_BASE + config
        policy = OpenpiPi0Policy.from_config(
            config=config, checkpoint=checkpoint, num_steps=num_steps, prompt=prompt
        )
    policy.set_max_batch(options.get("max_batch"))
    return policy
