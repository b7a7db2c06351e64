"""The ``pi0`` policy: Physical Intelligence's π₀ through openpi; :func:`make_pi0_policy` picks the path.

* **fast** (default, ``--policy pi0 [--config C] [--checkpoint DIR_OR_URL]``): openpi loads the checkpoint
  (its ``get_config`` and ``create_trained_policy``: parameters, norm stats, tokenizer, transforms) and
  ``pi0_fast.FastPi0Policy`` serves it through one jitted function per padded batch size; actions equal
  openpi's up to bf16 rounding (docs/pi0.md has the measured difference).
* **exact** (``--exact``): ``pi0_checkpoint.OpenpiPi0Policy`` repeats openpi's ``Policy.infer`` steps; actions
  are bit-identical to openpi's.
* **random weights** (``--random-weights``): ``pi0_random.RandomWeightsPi0Policy``, π₀'s compute with random
  bf16 parameters and no download.

The metadata says which (``"path": "fast" | "exact"``, ``random_weights``). Timing: ``inference_ms`` (=
``policy_timing["device_ms"]``) runs from the model call until the chunk is a host numpy array;
``preprocess_ms`` / ``postprocess_ms`` are the host work around it. openpi is not on the package index; see
``docs/pi0.md`` and :data:`INSTALL_HINT`.
"""

from __future__ import annotations

from typing import Any

from ..rtc import parse_rtc
from .pi0_checkpoint import OpenpiPi0Policy, load_openpi_policy
from .pi0_common import (
    ALOHA_ACTION_DIM,
    DEFAULT_CHECKPOINT_BASE,
    DEFAULT_CONFIG,
    INSTALL_HINT,
    OPENPI_COMMIT,
    OPENPI_GIT,
    OPTIONAL_CAMERAS,
    RANDOM_PROMPT_TOKENS,
    OpenpiNotInstalledError,
    _bucket,
    _import_openpi,
    logger,
    use_compile_cache,
)
from .pi0_fast import FastPi0Policy
from .pi0_host import FastPathUnsupported
from .pi0_random import RandomWeightsPi0Policy

__all__ = [
    "ALOHA_ACTION_DIM",
    "DEFAULT_CHECKPOINT_BASE",
    "DEFAULT_CONFIG",
    "INSTALL_HINT",
    "OPENPI_COMMIT",
    "OPENPI_GIT",
    "OPTIONAL_CAMERAS",
    "RANDOM_PROMPT_TOKENS",
    "FastPathUnsupported",
    "FastPi0Policy",
    "OpenpiNotInstalledError",
    "OpenpiPi0Policy",
    "RandomWeightsPi0Policy",
    "make_pi0_policy",
    "parse_rtc",
]


def _checkpoint_policy(
    config: str, checkpoint: str, num_steps: int, prompt: str | None, exact: bool, rtc_options: dict[str, Any]
) -> Any:
    policy, extra = load_openpi_policy(
        config=config, checkpoint=checkpoint, num_steps=num_steps, prompt=prompt
    )
    if not exact:
        if getattr(policy, "_is_pytorch_model", False):
            logger.warning("pi0: a PyTorch checkpoint has no fast path; serving openpi's steps (--exact)")
        else:
            try:
                return FastPi0Policy(
                    policy, extra=extra, num_steps=num_steps, default_prompt=prompt, **rtc_options
                )
            except FastPathUnsupported as exc:
                logger.warning(
                    "pi0: no fast path for this config (%s); serving openpi's steps (--exact)", exc
                )
    return OpenpiPi0Policy(policy, extra={**extra, "path": "exact"}, default_prompt=prompt)


def make_pi0_policy(
    *,
    config: str | None = DEFAULT_CONFIG,
    checkpoint: str | None = None,
    random_weights: bool = False,
    exact: bool = False,
    num_steps: int | None = 10,
    prompt: str | None = None,
    **options: Any,
) -> Any:
    """Build the ``pi0`` policy (``python -m pi0remote.serve --policy pi0 ...``).

    ``config``: openpi training config name (``pi0_aloha_sim``). ``checkpoint``: local path or ``gs://`` URL
    (default ``gs://openpi-assets/checkpoints/<config>``, cached by openpi under ``$OPENPI_DATA_HOME``,
    ``~/.cache/openpi`` by default). ``exact``: openpi's own ``Policy.infer`` steps instead of the fast path.
    ``random_weights``: same model, random bf16 weights, fixed prompt ids. ``num_steps``: flow-matching steps.
    ``prompt``: default prompt when a request carries none. ``max_batch``: the server's batch limit;
    ``warmup()`` then compiles every padded size up to it. ``rtc_beta`` / ``rtc_schedule``: real-time chunking
    on the fast path (``--rtc-beta``, ``--rtc-schedule``; the other paths answer ``rtc`` with
    ``InvalidInputError``). Other options are ignored, except ``seed`` and ``image_slots`` for random weights.
    jax's persistent compilation cache is turned on first (:func:`pi0_common.use_compile_cache`; metadata
    ``compile_cache`` names the directory).
    """
    config = config or DEFAULT_CONFIG
    num_steps = 10 if num_steps is None else int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    cache = use_compile_cache()
    if random_weights:
        if checkpoint:
            logger.warning("pi0: --random-weights given, ignoring checkpoint %s", checkpoint)
        _import_openpi("openpi")
        policy: Any = RandomWeightsPi0Policy(
            config=config,
            num_steps=num_steps,
            prompt=prompt,
            seed=int(options.get("seed") or 0),
            image_slots=int(options.get("image_slots") or 1),
        )
    else:
        checkpoint = checkpoint or DEFAULT_CHECKPOINT_BASE + config
        rtc_options = {k: options[k] for k in ("rtc_beta", "rtc_schedule") if options.get(k) is not None}
        policy = _checkpoint_policy(config, checkpoint, num_steps, prompt, bool(exact), rtc_options)
    policy.set_max_batch(options.get("max_batch"))
    policy.metadata.extra["compile_cache"] = cache
    return policy


_ = (_bucket, ALOHA_ACTION_DIM)  # re-exported for callers of the former single module
