"""Stand-in for openpi.training.config: named train configs."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 48


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    default_prompt: str | None = None
    use_quantile_norm: bool = False


_CONFIGS = {
    c.name: c
    for c in [
        TrainConfig("pi0_aloha_sim", default_prompt="Transfer cube"),
        TrainConfig("pi0_aloha_quantiles", default_prompt="Transfer cube", use_quantile_norm=True),
    ]
}


def get_config(config_name: str) -> TrainConfig:
    if config_name not in _CONFIGS:
        raise ValueError(f"Config '{config_name}' not found.")
    return _CONFIGS[config_name]
