"""Stand-in for openpi.policies.policy_config.create_trained_policy: the transform chain openpi builds for a
pi0 ALOHA config (same classes, same order), around the stand-in π₀ model."""

from __future__ import annotations

from typing import Any

import numpy as np

from openpi import transforms as T
from openpi.models import tokenizer as _tokenizer
from openpi.policies import aloha_policy
from openpi.policies import policy as _policy
from openpi.shared.normalize import NormStats

CREATED: list[dict[str, Any]] = []
"""Every call, for tests to inspect."""
SEEN_INPUTS: list[dict[str, Any]] = []
"""Every raw input a created policy received, before its transforms."""


def _record(data: dict) -> dict:
    SEEN_INPUTS.append(data)
    return data


def norm_stats(dim: int = 14, seed: int = 1) -> dict[str, NormStats]:
    """Non-trivial statistics (as a trained checkpoint's), so that normalization shows in the actions."""
    rng = np.random.default_rng(seed)

    def one() -> NormStats:
        mean, std = rng.uniform(-0.5, 0.5, dim), rng.uniform(0.3, 1.2, dim)
        return NormStats(mean=mean, std=std, q01=mean - 2 * std, q99=mean + 2 * std)

    return {"state": one(), "actions": one()}


def create_trained_policy(
    train_config: Any,
    checkpoint_dir: Any,
    *,
    repack_transforms: Any = None,
    sample_kwargs: dict[str, Any] | None = None,
    default_prompt: str | None = None,
    norm_stats: Any = None,
    pytorch_device: str | None = None,
) -> _policy.Policy:
    CREATED.append(
        {
            "train_config": train_config,
            "checkpoint_dir": checkpoint_dir,
            "sample_kwargs": sample_kwargs,
            "default_prompt": default_prompt,
        }
    )
    model_cfg = train_config.model
    model = _policy.FakePi0(
        {"action_horizon": model_cfg.action_horizon, "action_dim": model_cfg.action_dim, "width": 16}
    )
    stats = norm_stats if norm_stats is not None else globals()["norm_stats"]()
    quantiles = train_config.use_quantile_norm
    return _policy.Policy(
        model,
        transforms=[
            _record,
            T.InjectDefaultPrompt(default_prompt),
            aloha_policy.AlohaInputs(adapt_to_pi=True),
            T.Normalize(stats, use_quantiles=quantiles),
            T.InjectDefaultPrompt(train_config.default_prompt),
            T.ResizeImages(224, 224),
            T.TokenizePrompt(_tokenizer.PaligemmaTokenizer(model_cfg.max_token_len)),
            T.PadStatesAndActions(model_cfg.action_dim),
        ],
        output_transforms=[
            T.Unnormalize(stats, use_quantiles=quantiles),
            aloha_policy.AlohaOutputs(adapt_to_pi=True),
        ],
        sample_kwargs=sample_kwargs,
        metadata={"config": train_config.name},
    )
