"""π₀ from an openpi checkpoint: the loader both checkpoint paths use, and ``--exact`` (openpi's own steps).

:func:`load_openpi_policy` builds openpi's ``Policy`` with openpi's own ``get_config`` and
``create_trained_policy`` (every transform, the norm stats and the tokenizer are openpi's), and works with both
the orbax openpi pins and newer ones (whose ``PyTreeCheckpointer.metadata`` returns a ``StepMetadata`` that
openpi's ``restore_params`` cannot index). :class:`OpenpiPi0Policy` (``--exact``) repeats openpi's
``Policy.infer`` steps one by one, timing them: its actions are bit-identical to ``Policy.infer``'s.
The fast engine (``pi0_fast``) wraps the same loaded ``Policy``.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .pi0_common import (
    OPENPI_COMMIT,
    OPTIONAL_CAMERAS,
    _bucket,
    _device_name,
    _import_openpi,
    _ms,
    _Pi0Base,
    _prompt_of,
    logger,
)

__all__ = ["OpenpiPi0Policy", "load_openpi_policy", "restore_params_compat"]


def load_openpi_policy(
    *, config: str, checkpoint: str, num_steps: int, prompt: str | None
) -> tuple[Any, dict[str, Any]]:
    """openpi's ``create_trained_policy(get_config(config), checkpoint, ...)``; returns (Policy, metadata extra)."""
    config_mod, policy_config, model_mod = _import_openpi(
        "openpi.training.config", "openpi.policies.policy_config", "openpi.models.model"
    )
    train_config = config_mod.get_config(config)
    # openpi's default (10 steps) is left implicit, so that the jitted call is the very one openpi serves.
    sample_kwargs = None if num_steps == 10 else {"num_steps": num_steps}
    t0 = time.perf_counter()
    with _orbax_compat(model_mod) as used:
        policy = policy_config.create_trained_policy(
            train_config, checkpoint, default_prompt=prompt, sample_kwargs=sample_kwargs
        )
    extra = {
        "config": config,
        "checkpoint": checkpoint,
        "num_steps": num_steps,
        "random_weights": False,
        "prompt": prompt,
        "load_s": round(time.perf_counter() - t0, 3),
        "openpi_commit": OPENPI_COMMIT,
        "params_restore": "pi0remote (orbax metadata fallback)" if used else "openpi",
    }
    return policy, extra


@contextlib.contextmanager
def _orbax_compat(model_mod: Any) -> Iterator[list[bool]]:
    """While openpi loads a checkpoint, let its ``restore_params`` fall back to :func:`restore_params_compat`
    when the installed orbax returns metadata it cannot index. With the orbax openpi pins, openpi's own
    function does all the work. Yields a list that holds True once the fallback ran."""
    used: list[bool] = []
    original = getattr(model_mod, "restore_params", None)
    if original is None:
        yield used
        return

    def restore_params(params_path: Any, **kwargs: Any) -> Any:
        try:
            return original(params_path, **kwargs)
        except TypeError as exc:
            if "not subscriptable" not in str(exc):
                raise
            logger.warning(
                "openpi's restore_params cannot read this orbax's metadata (%s); using its item_metadata", exc
            )
            used.append(True)
            return restore_params_compat(params_path, **kwargs)

    model_mod.restore_params = restore_params
    try:
        yield used
    finally:
        model_mod.restore_params = original


def _plain_tree(x: Any) -> Any:
    """Nested mappings (orbax's metadata containers included) as plain dicts; leaves stay."""
    if isinstance(x, Mapping):
        return {k: _plain_tree(v) for k, v in x.items()}
    return x


def _as_restored(jax: Any, x: Any, restore_type: Any, dtype: Any, sharding: Any) -> Any:
    x = np.asarray(x) if dtype is None else np.asarray(x).astype(dtype)
    return jax.device_put(x, sharding) if restore_type is jax.Array else x


def restore_params_compat(
    params_path: Any, *, restore_type: Any = None, dtype: Any = None, sharding: Any = None
) -> dict[str, Any]:
    """openpi's ``restore_params`` contract (a pure dict of arrays from ``DIR/params``) for orbax versions whose
    ``PyTreeCheckpointer.metadata`` returns a ``StepMetadata`` (the tree is its ``item_metadata``)."""
    jax = importlib.import_module("jax")
    ocp = importlib.import_module("orbax.checkpoint")
    traverse_util = importlib.import_module("flax.traverse_util")
    restore_type = jax.Array if restore_type is None else restore_type
    if not str(params_path).startswith("gs://"):
        params_path = pathlib.Path(params_path).resolve()
    if restore_type is jax.Array and sharding is None:
        mesh = jax.sharding.Mesh(jax.devices(), ("x",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(params_path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        item = {"params": _plain_tree(tree["params"])}
        args = jax.tree.map(
            lambda _: ocp.ArrayRestoreArgs(sharding=sharding, restore_type=restore_type, dtype=dtype), item
        )
        try:
            params = ckptr.restore(params_path, ocp.args.PyTreeRestore(item=item, restore_args=args))[
                "params"
            ]
        except (TypeError, ValueError) as exc:  # metadata leaves this orbax will not take back as a target
            logger.info("orbax restore with the metadata tree failed (%s); restoring the saved tree", exc)
            params = ckptr.restore(params_path)["params"]
            params = jax.tree.map(lambda x: _as_restored(jax, x, restore_type, dtype, sharding), params)
    flat = traverse_util.flatten_dict(params)
    if flat and all(kp[-1] == "value" for kp in flat):  # saved by openpi's training (nnx.State leaves)
        flat = {kp[:-1]: v for kp, v in flat.items()}
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------------------------
# --exact: openpi's Policy.infer, step by step


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
        self.metadata.extra.setdefault("path", "exact")
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
        policy, extra = load_openpi_policy(
            config=config, checkpoint=checkpoint, num_steps=num_steps, prompt=prompt
        )
        return cls(policy, extra={**extra, "path": "exact"}, default_prompt=prompt)

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
        self._validate(obs)
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
            self._validate(obs)
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
