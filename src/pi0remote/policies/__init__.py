"""Server-side policies and the loader behind ``--policy NAME|module:attr``."""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    CANONICAL_INPUT_SPEC,
    ArraySpec,
    Policy,
    PolicyMetadata,
    policy_metadata,
    validate_obs,
    validate_request,
)

__all__ = [
    "CANONICAL_INPUT_SPEC",
    "ArraySpec",
    "Policy",
    "PolicyMetadata",
    "load_policy",
    "policy_metadata",
    "validate_obs",
    "validate_request",
]

# Built-in names and where they live; heavy ones are imported only when asked for.
BUILTIN = {
    "zeros": "pi0remote.policies.builtin:ZerosPolicy",
    "echo": "pi0remote.policies.builtin:EchoPolicy",
    "expert": "pi0remote.sim.expert:ExpertPolicy",
    "pi0": "pi0remote.policies.pi0:make_pi0_policy",
    "flow": "pi0remote.policies.flow:make_flow_policy",
}


def _import_attr(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"policy must be a built-in name or module:attr, got {spec!r}")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_policy(name: str, **options: Any) -> Any:
    """Build the policy named ``name``.

    ``zeros``, ``echo``, ``expert``, ``pi0``, ``flow`` or ``flow:WEIGHTS.npz``, ``sleep:MS`` or
    ``sleep:BASE+PER``, or ``module:attr`` where
    attr is a policy object, or a class / factory that returns one (called with ``options``).
    Options not meant for a policy are the caller's to drop.
    """
    if name.startswith("sleep:"):
        from .builtin import SleepPolicy

        return SleepPolicy.parse(name[len("sleep:") :])
    if name.startswith("flow:"):
        from .flow import make_flow_policy

        return make_flow_policy(name[len("flow:") :], **options)
    target = BUILTIN.get(name, name)
    obj = _import_attr(target)
    if hasattr(obj, "infer") and not isinstance(obj, type):
        return obj
    if callable(obj):
        policy = obj(**options) if options else obj()
        if not hasattr(policy, "infer"):
            raise TypeError(f"{name!r} built {type(policy).__name__}, which has no infer(obs)")
        return policy
    raise TypeError(f"{name!r} is neither a policy (has infer) nor a factory")
