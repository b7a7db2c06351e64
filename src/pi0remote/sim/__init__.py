"""Simulation for the evaluation harness: gym-aloha environments and the privileged scripted expert.

Nothing heavy is imported here: ``pi0remote.sim.env`` imports gym-aloha / MuJoCo inside
:func:`~pi0remote.sim.env.make_env`, and ``pi0remote.sim.expert`` imports MuJoCo when an expert is built.
"""

from __future__ import annotations

__all__ = ["make_env", "obs_to_request", "resize_with_pad", "ExpertPolicy"]


def __getattr__(name: str):
    if name in {"make_env", "obs_to_request", "resize_with_pad"}:
        from . import env

        return getattr(env, name)
    if name == "ExpertPolicy":
        from .expert import ExpertPolicy

        return ExpertPolicy
    raise AttributeError(name)
