"""``python -m pi0remote.train_flow``: train the ``flow`` policy on scripted-expert demonstrations.

    python -m pi0remote.train_flow --episodes 500 --out DIR [--seed 0]

Three stages, each timed in the card:

1. **collect** (:func:`collect`): ``--episodes`` transfer-cube episodes on gym-aloha (seeds
   ``100000 + 10000 * seed + i``, far from the evaluation seeds), each driven by the expert's plan
   with *perturbations*: smooth Ornstein-Uhlenbeck noise on the executed joint targets (a random
   scale per episode, some episodes clean) and occasional pushes (an offset held for a few dozen steps).
   What is recorded is the observed joints, the cube x, y at reset and the expert's *clean* chunk
   ``plan[t : t + 50]``, so the policy learns to return to the plan from states the expert never
   visits itself (DART-style).
2. **train** (:func:`train`): flow matching (:func:`pi0remote.policies.flow.flow_loss`) with AdamW,
   warmup + cosine learning rate, gradient clipping and an EMA of the weights (the EMA is shipped).
   Batches are drawn on the device inside a jitted ``lax.scan`` of many steps; JAX uses the GPU when
   it sees one.
3. **evaluate** (:func:`evaluate_heldout`): closed-loop success of the EMA weights on held-out seeds
   (``--eval-seed``, default 1000-1049) through the evaluation harness (sync clock, blocking,
   ``--action-horizon`` steps executed per chunk), plus the inference p50 at batch 1 and 8.

Writes ``DIR/flow_aloha.npz`` (the weights, loadable with ``--policy flow:DIR/flow_aloha.npz``) and
``DIR/card.json`` (data, recipe, steps, loss curve, times, held-out success with its Wilson interval,
the exact command). Deterministic given ``--seed`` on one machine and backend (float summation order
may differ across them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .policies import flow as F

TRAIN_SEED_BASE = 100_000
SEED_STRIDE = 10_000
RECORD_STEPS = 300
AFTER_SUCCESS = 10
COLLECT_KEYS = ("episodes", "seed", "noise_max", "clean_fraction", "push_prob", "push_rad")


@dataclass
class Recipe:
    episodes: int = 500
    seed: int = 0
    steps: int = 20000
    batch: int = 256
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 1e-4
    ema: float = 0.999
    width: int = 256
    emb: int = 128
    blocks: int = 3
    noise_max: float = 0.05
    """Largest per-episode OU noise scale on arm joint targets (radians); grippers get a third."""
    clean_fraction: float = 0.2
    push_prob: float = 0.5
    push_rad: float = 0.15
    scan: int = 100
    """Optimiser steps per jitted call."""


def say(message: str) -> None:
    """Progress lines, flushed (the trainer usually runs in the background with a log file)."""
    print(message, flush=True)


# ------------------------------------------------------------------------------------------- collect


def perturbation(rng: np.random.Generator, recipe: Recipe, steps: int) -> np.ndarray:
    """Noise [steps, 14] added to the executed joint targets of one episode."""
    out = np.zeros((steps, 14))
    if rng.random() < recipe.clean_fraction:
        return out
    sigma = rng.uniform(0.2, 1.0) * recipe.noise_max
    scale = np.full(14, sigma)
    scale[[6, 13]] = sigma / 3
    theta = 0.1  # OU mean reversion per step: correlation time ~10 steps
    x = np.zeros(14)
    for t in range(steps):
        x = (1 - theta) * x + np.sqrt(2 * theta) * scale * rng.standard_normal(14)
        out[t] = x
    if rng.random() < recipe.push_prob:
        start, length = int(rng.integers(0, 220)), int(rng.integers(10, 40))
        joints = rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12], size=3, replace=False)
        out[start : start + length, joints] += rng.uniform(-1, 1, 3) * recipe.push_rad
    return out


def collect_episode(env: Any, planner: Any, seed: int, rng: np.random.Generator, recipe: Recipe) -> dict:
    """One perturbed expert episode: observed joints [T, 14], cube x, y, plan [450, 14], success step."""
    from .sim.expert import cube_position

    obs = env.reset(seed=seed)
    cube = cube_position(env.env_state())
    plan = planner.plan(cube)
    noise = perturbation(rng, recipe, RECORD_STEPS)
    states, success, t = [], None, 0
    for t in range(RECORD_STEPS):
        states.append(np.asarray(obs["agent_pos"], np.float32))
        obs, _, terminated, _, _ = env.step(plan[t] + noise[t])
        if terminated and success is None:
            success = t + 1
        if success is not None and t + 1 >= success + AFTER_SUCCESS:
            break
    return {"states": np.stack(states), "cube": cube[:2].astype(np.float32), "plan": plan, "success": success}


def collect(recipe: Recipe, log: Any = say) -> dict[str, Any]:
    """All demonstrations, as arrays ready for :func:`train` (see the module docstring)."""
    from .sim.env import make_env
    from .sim.expert import TransferCubePlanner

    planner = TransferCubePlanner()
    states, cubes, ep_index, t_index, plans, successes = [], [], [], [], [], []
    with make_env(render=False, max_steps=RECORD_STEPS + 1) as env:
        for i in range(recipe.episodes):
            rng = np.random.default_rng([recipe.seed, i])
            ep = collect_episode(env, planner, TRAIN_SEED_BASE + SEED_STRIDE * recipe.seed + i, rng, recipe)
            n = len(ep["states"])
            states.append(ep["states"])
            cubes.append(np.repeat(ep["cube"][None], n, 0))
            ep_index.append(np.full(n, i, np.int32))
            t_index.append(np.arange(n, dtype=np.int32))
            plans.append(ep["plan"])
            successes.append(ep["success"] is not None)
            if (i + 1) % 50 == 0 or i + 1 == recipe.episodes:
                log(f"collect: {i + 1}/{recipe.episodes} episodes, {sum(successes)} successful")
    return {
        "cond": np.concatenate([np.concatenate(states), np.concatenate(cubes)], axis=1),
        "ep": np.concatenate(ep_index), "t": np.concatenate(t_index),
        "plans": np.stack(plans).astype(np.float32), "successes": int(sum(successes)),
    }  # fmt: skip


def collect_or_load(recipe: Recipe, cache: str | None, log: Any = say) -> dict[str, Any]:
    """:func:`collect`, or the same demonstrations from a cache written by an earlier run."""
    key = np.array(json.dumps({k: v for k, v in asdict(recipe).items() if k in COLLECT_KEYS}))
    if cache and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["recipe"]) == str(key):
                log(f"collect: loaded {cache}")
                return {k: (int(z[k]) if k == "successes" else z[k]) for k in z.files if k != "recipe"}
        log(f"collect: {cache} was collected with other settings; collecting again")
    data = collect(recipe, log)
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, recipe=key, **data)
    return data


# --------------------------------------------------------------------------------------------- train


def _device_data(data: dict[str, Any], norm: F.Normalizer) -> dict[str, Any]:
    jnp = F.import_jax().numpy
    return {
        "cond": jnp.asarray(norm.cond(data["cond"])), "ep": jnp.asarray(data["ep"]),
        "t": jnp.asarray(data["t"]), "plans": jnp.asarray(norm.to_model(data["plans"])),
    }  # fmt: skip


def make_step(recipe: Recipe, dev: dict[str, Any], optimizer: Any) -> Any:
    """One optimiser step on a batch drawn on the device: ``(carry, key) -> (carry, loss)``."""
    jax = F.import_jax()
    jnp, optax = jax.numpy, __import__("optax")
    n, last = dev["cond"].shape[0], dev["plans"].shape[1] - 1

    def step(carry: tuple, key: Any) -> tuple:
        params, opt_state, ema, count = carry
        k_idx, k_noise, k_time = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (recipe.batch,), 0, n)
        rows = jnp.minimum(dev["t"][idx][:, None] + jnp.arange(F.HORIZON), last)
        actions = dev["plans"][dev["ep"][idx][:, None], rows]
        noise = jax.random.normal(k_noise, actions.shape)
        t = jax.random.beta(k_time, 1.5, 1.0, (recipe.batch,)) * 0.999 + 0.001
        loss, grads = jax.value_and_grad(F.flow_loss)(params, actions, dev["cond"][idx], noise, t)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(recipe.ema, (1.0 + count) / (10.0 + count))  # short runs: EMA warm-up
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        return (params, opt_state, ema, count + 1), loss

    return step


def train(data: dict[str, Any], recipe: Recipe, log: Any = say) -> tuple[Any, F.Normalizer, list]:
    """Flow-matching training; returns (EMA params as numpy, normaliser, loss curve)."""
    jax = F.import_jax()
    import optax

    used = data["plans"][:, : int(data["t"].max()) + F.HORIZON]
    norm = F.Normalizer.fit(used, data["cond"])
    dev = _device_data(data, norm)
    key = jax.random.PRNGKey(recipe.seed)
    key, k_init = jax.random.split(key)
    params = F.init_params(k_init, recipe.width, recipe.emb, recipe.blocks)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, recipe.lr, min(recipe.warmup, recipe.steps // 10), recipe.steps, recipe.lr * 0.02
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=recipe.weight_decay)
    )
    carry = (params, optimizer.init(params), params, jax.numpy.zeros((), jax.numpy.float32))
    run = jax.jit(lambda c, keys: jax.lax.scan(make_step(recipe, dev, optimizer), c, keys))
    curve, done, t0 = [], 0, time.perf_counter()
    while done < recipe.steps:
        n = min(recipe.scan, recipe.steps - done)
        key, sub = jax.random.split(key)
        carry, losses = run(carry, jax.random.split(sub, n))
        losses = np.asarray(losses)
        done += n
        curve.append({"step": done, "loss": float(losses.mean())})
        if len(curve) % 10 == 1 or done == recipe.steps:
            log(
                f"train: step {done}/{recipe.steps} loss {losses.mean():.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    ema = jax.tree_util.tree_map(np.asarray, carry[2])
    return ema, norm, curve


# ------------------------------------------------------------------------------------------ evaluate


def evaluate_heldout(
    weights: Path, seed: int, episodes: int, action_horizon: int, log: Any = say
) -> dict[str, Any]:
    """Closed-loop success on seeds ``seed .. seed + episodes - 1`` (sync clock, blocking execution)."""
    from .harness.eval import DirectPolicy, EvalConfig, run_episode
    from .harness.stats import wilson_interval
    from .sim.env import make_env

    cfg = EvalConfig(episodes=episodes, seed=seed, action_horizon=action_horizon, images=False)
    client = DirectPolicy(F.FlowPolicy(weights), "flow")
    results = []
    with make_env(render=False, max_steps=cfg.max_steps) as env:
        for i in range(episodes):
            try:
                results.append(run_episode(client, env, seed + i, cfg, mode="flow", episode=i).success)
            except Exception as exc:  # an unstable simulation (dm_control PhysicsError) is a failure
                log(f"eval: seed {seed + i} ended with {type(exc).__name__}: {exc}")
                results.append(False)
    failed = [seed + i for i, ok in enumerate(results) if not ok]
    k = sum(results)
    low, high = wilson_interval(k, episodes)
    log(f"eval: {k}/{episodes} on seeds {seed}-{seed + episodes - 1} (95% Wilson [{low:.2f}, {high:.2f}])")
    return {
        "seeds": [seed, seed + episodes - 1], "episodes": episodes, "successes": k,
        "success_rate": k / episodes if episodes else 0.0, "wilson95": [low, high],
        "action_horizon": action_horizon, "clock": "sync", "exec": "blocking",
        "failed_seeds": failed,
    }  # fmt: skip


def inference_p50(weights: Path, calls: int = 50) -> dict[str, float]:
    """Median wall time of one ``infer`` (batch 1) and one ``infer_batch`` of 8, after a warm-up, in ms."""
    policy = F.FlowPolicy(weights)
    rng = np.random.default_rng(0)
    obs = [
        {"state": rng.normal(0, 0.3, 14).astype(np.float32), "env_state": {"cube_pos": [0.0, 0.5, 0.02]}}
        for _ in range(8)
    ]
    out = {}
    for name, fn in (
        ("batch1_ms", lambda: policy.infer(obs[0])),
        ("batch8_ms", lambda: policy.infer_batch(obs)),
    ):
        for _ in range(3):
            fn()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = float(np.median(times))
    return out


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pi0remote.train_flow", description=__doc__.splitlines()[0])
    d = Recipe()
    p.add_argument("--episodes", type=int, default=d.episodes, help="expert demonstrations to collect")
    p.add_argument("--out", required=True, help="folder for flow_aloha.npz and card.json")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--blocks", type=int, default=d.blocks)
    p.add_argument("--noise-max", type=float, default=d.noise_max, help="largest OU noise scale (rad)")
    p.add_argument(
        "--data", default=None, metavar="NPZ",
        help="demonstrations cache: loaded if it exists (and matches --episodes/--seed), else written",
    )  # fmt: skip
    p.add_argument(
        "--eval-episodes", type=int, default=50, help="held-out episodes (0: skip, and skip the timing)"
    )
    p.add_argument("--eval-seed", type=int, default=1000, help="first held-out seed")
    p.add_argument("--action-horizon", type=int, default=10, help="steps executed per chunk in the eval")
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    r = Recipe(
        episodes=args.episodes, seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr,
        width=args.width, blocks=args.blocks, noise_max=args.noise_max,
    )  # fmt: skip
    if min(r.episodes, r.steps, r.batch, r.width, r.blocks) < 1 or args.eval_episodes < 0:
        raise SystemExit("--episodes, --steps, --batch, --width, --blocks must be positive")
    return r


def run(args: argparse.Namespace, log: Any = say) -> dict[str, Any]:
    """Collect, train, save, evaluate; returns the card (also written to ``OUT/card.json``)."""
    jax = F.import_jax()
    recipe = recipe_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    data = collect_or_load(recipe, args.data, log)
    times["collect_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    params, norm, curve = train(data, recipe, log)
    times["train_s"] = time.perf_counter() - t1
    card: dict[str, Any] = {
        "command": "python -m pi0remote.train_flow " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "recipe": asdict(recipe),
        "data": {
            "episodes": recipe.episodes, "samples": int(len(data["t"])),
            "expert_successes": data["successes"],
            "env_seeds": [TRAIN_SEED_BASE + SEED_STRIDE * recipe.seed,
                          TRAIN_SEED_BASE + SEED_STRIDE * recipe.seed + recipe.episodes - 1],
            "inputs": "state (14 joints) + cube x, y at reset (privileged env_state); no camera",
        },
        "model": {
            "params": int(sum(v.size for v in F.flatten_params(params).values())),
            "horizon": F.HORIZON, "action_dim": F.ACTION_DIM, "num_steps": F.NUM_STEPS,
        },
        "training": {"steps": recipe.steps, "loss_first": curve[0]["loss"], "loss_last": curve[-1]["loss"],
                     "curve": curve[:: max(1, len(curve) // 40)] + curve[-1:]},
        "backend": jax.default_backend(), "platform": platform.platform(), "cpus": os.cpu_count(),
    }  # fmt: skip
    weights = F.save_weights(out / F.DEFAULT_WEIGHTS, params, norm, {"recipe": asdict(recipe)})
    if args.eval_episodes:
        t2 = time.perf_counter()
        card["heldout"] = evaluate_heldout(
            weights, args.eval_seed, args.eval_episodes, args.action_horizon, log
        )
        times["eval_s"] = time.perf_counter() - t2
        card["inference_p50_ms"] = inference_p50(weights)
    times["total_s"] = time.perf_counter() - t0
    card["time"] = times
    F.save_weights(
        weights,
        params,
        norm,
        {"recipe": asdict(recipe), "card": {k: v for k, v in card.items() if k != "training"}},
    )
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {weights} and {out / 'card.json'} ({times['total_s']:.0f} s)")
    return card


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    args = build_parser().parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
