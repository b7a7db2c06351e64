"""A deployment's settings: :class:`DeployConfig`, read from ``PI0REMOTE_*`` environment variables, and the
names and constants the other deploy modules and the ``modal://`` resolver share."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PORTAL_TRANSPORTS = ("tcp", "quic+tcp")
"""Raw transports a deployment can expose through TCP port forwarding (QUIC over UDP cannot be forwarded)."""

DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_STALE_AFTER_S = 60.0
"""Clients ignore entries whose heartbeat is older than this (four missed heartbeats)."""
PRUNE_AFTER_S = 600.0
LOAD_PUBLISH_MIN_S = 0.02
"""A change of connected robots is published at once, but not more often than this."""
"""A starting container deletes entries this old: containers that died without unpublishing."""

OPENPI_DATA_HOME = "OPENPI_DATA_HOME"
TOKEN_ENV = "PI0REMOTE_TOKEN"


def _env_bool(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _env_int(value: str | None, default: int | None) -> int | None:
    if value is None or value.strip() == "":
        return default
    if value.strip().lower() in ("none", "unset"):
        return None
    return int(value)


def _env_float(value: str | None, default: float) -> float:
    if value is None or value.strip() == "":
        return default
    return float(value)


def _env_list(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass
class DeployConfig:
    """One deployment's settings. :meth:`from_env` reads them from ``PI0REMOTE_*`` variables (names below)."""

    app_name: str = "pi0remote"  # PI0REMOTE_APP
    gpu: str | None = "H100"  # PI0REMOTE_GPU ("none" for a CPU-only deployment, e.g. the zeros policy)
    region: str | list[str] | None = None  # PI0REMOTE_REGION (comma list; unset: anywhere)
    routing_region: str | None = None  # PI0REMOTE_ROUTING_REGION: where Modal routes web-endpoint inputs
    secret_name: str = "pi0remote-token"  # PI0REMOTE_SECRET (a Modal Secret holding PI0REMOTE_TOKEN)
    volume_name: str = "pi0remote-cache"  # PI0REMOTE_VOLUME
    min_containers: int = 1  # PI0REMOTE_MIN_CONTAINERS
    max_containers: int | None = None  # PI0REMOTE_MAX_CONTAINERS
    robots_per_container: int = 8  # PI0REMOTE_ROBOTS_PER_CONTAINER: what the control loop plans for
    spare_containers: int = 1  # PI0REMOTE_SPARE_CONTAINERS: warm containers beyond the robots' need
    buffer_containers: int = 0  # PI0REMOTE_BUFFER_CONTAINERS: Modal's buffer (web-endpoint inputs)
    autoscale_s: int = 60  # PI0REMOTE_AUTOSCALE_S: period of the control loop (0: no control loop)
    scaledown_window: int = 300  # PI0REMOTE_SCALEDOWN_S
    max_inputs: int = 64  # PI0REMOTE_MAX_INPUTS: concurrent web requests / WebSockets per container
    memory_snapshot: bool = True  # PI0REMOTE_MEMORY_SNAPSHOT
    proxy_auth: bool = False  # PI0REMOTE_PROXY_AUTH: also require Modal-Key / Modal-Secret on web endpoints
    policy: str = "pi0"  # PI0REMOTE_POLICY
    config: str = "pi0_aloha_sim"  # PI0REMOTE_CONFIG
    checkpoint: str | None = None  # PI0REMOTE_CHECKPOINT (default gs://openpi-assets/checkpoints/<config>)
    random_weights: bool = False  # PI0REMOTE_RANDOM_WEIGHTS
    auto_fetch: bool = True  # PI0REMOTE_AUTO_FETCH: first start runs the setup function if the cache is empty
    num_steps: int | None = None  # PI0REMOTE_NUM_STEPS
    prompt: str | None = None  # PI0REMOTE_PROMPT
    max_batch: int = 1  # PI0REMOTE_MAX_BATCH
    portals: tuple[str, ...] = PORTAL_TRANSPORTS  # PI0REMOTE_PORTALS
    tcp_port: int = 8765  # PI0REMOTE_TCP_PORT (inside the container)
    quic_port: int = 8766  # PI0REMOTE_QUIC_PORT (inside the container)
    heartbeat_s: float = DEFAULT_HEARTBEAT_S  # PI0REMOTE_HEARTBEAT_S
    cache_dir: str = "/cache"  # where the Volume is mounted
    env_names: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeployConfig:
        env = os.environ if environ is None else environ
        d = cls()
        gpu = env.get("PI0REMOTE_GPU")
        if gpu is not None:
            gpu = gpu.strip() or None
            if gpu is not None and gpu.lower() in ("none", "cpu"):
                gpu = None
        else:
            gpu = d.gpu
        regions = _env_list(env.get("PI0REMOTE_REGION"), ())
        region: str | list[str] | None = None
        if len(regions) == 1:
            region = regions[0]
        elif regions:
            region = list(regions)
        portals = _env_list(env.get("PI0REMOTE_PORTALS"), d.portals)
        unknown = set(portals) - set(PORTAL_TRANSPORTS)
        if unknown:
            raise ValueError(f"PI0REMOTE_PORTALS: unknown {sorted(unknown)}; choose from {PORTAL_TRANSPORTS}")
        return cls(
            app_name=env.get("PI0REMOTE_APP") or d.app_name,
            gpu=gpu,
            region=region,
            routing_region=env.get("PI0REMOTE_ROUTING_REGION") or None,
            secret_name=env.get("PI0REMOTE_SECRET") or d.secret_name,
            volume_name=env.get("PI0REMOTE_VOLUME") or d.volume_name,
            min_containers=_env_int(env.get("PI0REMOTE_MIN_CONTAINERS"), d.min_containers) or 0,
            max_containers=_env_int(env.get("PI0REMOTE_MAX_CONTAINERS"), d.max_containers),
            robots_per_container=_env_int(env.get("PI0REMOTE_ROBOTS_PER_CONTAINER"), None)
            or d.robots_per_container,
            spare_containers=_env_int(env.get("PI0REMOTE_SPARE_CONTAINERS"), d.spare_containers) or 0,
            buffer_containers=_env_int(env.get("PI0REMOTE_BUFFER_CONTAINERS"), d.buffer_containers) or 0,
            autoscale_s=_env_int(env.get("PI0REMOTE_AUTOSCALE_S"), d.autoscale_s) or 0,
            scaledown_window=_env_int(env.get("PI0REMOTE_SCALEDOWN_S"), d.scaledown_window)
            or d.scaledown_window,
            max_inputs=_env_int(env.get("PI0REMOTE_MAX_INPUTS"), d.max_inputs) or d.max_inputs,
            memory_snapshot=_env_bool(env.get("PI0REMOTE_MEMORY_SNAPSHOT"), d.memory_snapshot),
            proxy_auth=_env_bool(env.get("PI0REMOTE_PROXY_AUTH"), d.proxy_auth),
            policy=env.get("PI0REMOTE_POLICY") or d.policy,
            config=env.get("PI0REMOTE_CONFIG") or d.config,
            checkpoint=env.get("PI0REMOTE_CHECKPOINT") or None,
            random_weights=_env_bool(env.get("PI0REMOTE_RANDOM_WEIGHTS"), d.random_weights),
            auto_fetch=_env_bool(env.get("PI0REMOTE_AUTO_FETCH"), d.auto_fetch),
            num_steps=_env_int(env.get("PI0REMOTE_NUM_STEPS"), None),
            prompt=env.get("PI0REMOTE_PROMPT") or None,
            max_batch=_env_int(env.get("PI0REMOTE_MAX_BATCH"), d.max_batch) or 1,
            portals=portals,
            tcp_port=_env_int(env.get("PI0REMOTE_TCP_PORT"), d.tcp_port) or 0,
            quic_port=_env_int(env.get("PI0REMOTE_QUIC_PORT"), d.quic_port) or 0,
            heartbeat_s=_env_float(env.get("PI0REMOTE_HEARTBEAT_S"), d.heartbeat_s),
            cache_dir=env.get("PI0REMOTE_CACHE_DIR") or d.cache_dir,
            env_names=tuple(sorted(k for k in env if k.startswith("PI0REMOTE_") and k != TOKEN_ENV)),
        )

    def container_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The ``PI0REMOTE_*`` settings the deployer set (never the token), to hand to the containers.

        The app module is imported again inside each container, where the deployer's environment is absent;
        forwarding these makes the container see the same app name, store name and policy options.
        """
        env = os.environ if environ is None else environ
        out = {k: env[k] for k in self.env_names if k in env}
        out[OPENPI_DATA_HOME] = self.openpi_data_home
        return out

    def scaling_policy(self) -> Any:
        """The control loop's rule for this deployment (:class:`pi0remote.scaling.ScalingPolicy`)."""
        from ..scaling import ScalingPolicy

        return ScalingPolicy(
            robots_per_container=self.robots_per_container,
            floor=self.min_containers,
            max_containers=self.max_containers,
            spare=self.spare_containers,
            buffer_containers=self.buffer_containers,
        )

    @property
    def scaling_state_name(self) -> str:
        """Name of the ``modal.Dict`` where the control loop keeps its last decision."""
        return f"{self.app_name}-scaling"

    @property
    def endpoints_name(self) -> str:
        """Name of the store (a ``modal.Dict``) where containers publish their portals."""
        return endpoints_store_name(self.app_name)

    @property
    def openpi_data_home(self) -> str:
        return f"{self.cache_dir.rstrip('/')}/openpi"

    @property
    def checkpoint_url(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        from ..policies.pi0 import DEFAULT_CHECKPOINT_BASE

        return DEFAULT_CHECKPOINT_BASE + self.config

    def policy_options(self) -> dict[str, Any]:
        """Options for :func:`pi0remote.policies.load_policy` (the pi0 ones only for the pi0 policy)."""
        if self.policy != "pi0":
            return {}
        opts: dict[str, Any] = {"config": self.config}
        if self.random_weights:
            opts["random_weights"] = True
        if self.num_steps is not None:
            opts["num_steps"] = self.num_steps
        if self.prompt is not None:
            opts["prompt"] = self.prompt
        return opts


def endpoints_store_name(app_name: str) -> str:
    return f"{app_name}-endpoints"
