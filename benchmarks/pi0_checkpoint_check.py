"""The π₀ checkpoint path in process: fast vs openpi's ``Policy.infer`` (equivalence), exact (bit-identity), timing.

    PYTHONPATH=src:.openpi_src python benchmarks/pi0_checkpoint_check.py --checkpoint DIR [--config pi0_aloha_sim]
        [--n 50] [--parts equiv,floor,rtc,timing] [--out results/pi0]

One openpi ``Policy`` is loaded (pi0remote's loader: openpi's ``create_trained_policy`` with the orbax fallback);
the fast path (``FastPi0Policy``) and ``--exact`` (``OpenpiPi0Policy``) wrap that same object, so all three
read the same parameters, norm stats and tokenizer.

* ``equiv``: per case (one camera; wrists; all cameras; other prompts) the same observation and noise through
  ``Policy.infer(obs, noise=...)`` and the fast path: max and mean |Δ| in robot units next to mean |a|; the
  same with the rng's own noise (same key); ``--exact`` against ``Policy.infer`` (same rng): bit-identical?
* ``timing``: warm-up (compile per padded batch size), batch 1 (fast, exact, openpi's ``Policy.infer``),
  ``infer_batch`` at 2, 4, 8 (fast), wall clock and ``inference_ms``.
* ``floor``: openpi against itself, batch 1 vs batch 2 (two XLA programs): the scale of bf16 reordering.
* ``rtc``: guided vs unguided on the same observations and noise: prefix_error (the prefix: the last n actions
  of a chunk for an earlier observation), and the time of guided vs unguided calls at batch 1 and 8.

Writes ``pi0_checkpoint_check.json`` under ``--out`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "benchmarks", ROOT / "src", ROOT / ".openpi_src"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pi0_model_timing import env_info, stats, time_batches, time_infer  # noqa: E402


def make_obs(
    rng: np.random.Generator, cams: tuple[str, ...] = (), prompt: str | None = None
) -> dict[str, Any]:
    o: dict[str, Any] = {
        "cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
        "state": rng.uniform(-0.5, 0.5, 14).astype(np.float32),
    }
    o["state"][[6, 13]] = rng.uniform(0.2, 0.8, 2)  # grippers: ALOHA's 0 (closed) .. 1 (open)
    for c in cams:
        o[c] = rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)
    if prompt is not None:
        o["prompt"] = prompt
    return o


CASES = {
    "one camera": ((), None),
    "one camera, prompt": ((), "pick up the red cube"),
    "two wrists": (("cam_left_wrist", "cam_right_wrist"), None),
    "all four cameras": (("cam_low", "cam_left_wrist", "cam_right_wrist"), "Transfer cube"),
}


def diff_stats(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    d = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
    return {
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "mean_abs_action": float(np.mean(np.abs(ref))),
        "max_abs_action": float(np.max(np.abs(ref))),
    }


def equivalence(op: Any, fast: Any, exact: Any, to_openpi: Any, seeds: int) -> dict[str, Any]:
    """With all three image slots present the fast path runs the shapes openpi runs, so a difference there
    beyond float rounding is a mapping error, not bf16 reordering."""
    import jax

    out: dict[str, Any] = {}
    for name, (cams, prompt) in CASES.items():
        policy = fast
        rows = []
        for s in range(seeds):
            rng = np.random.default_rng(1000 + s)
            o = make_obs(rng, cams, prompt)
            noise = rng.standard_normal((50, int(op._model.action_dim))).astype(np.float32)
            ref = np.asarray(op.infer(to_openpi(o), noise=noise)["actions"])
            got = policy.infer(o, noise=noise)["action"]
            rows.append(diff_stats(got, ref) | {"slots": list(policy.last_call["slots"])})
        out[name] = {
            "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in rows])),
            "mean_abs_action": float(np.mean([r["mean_abs_action"] for r in rows])),
            "max_abs_action": max(r["max_abs_action"] for r in rows),
            "prefix_slots": rows[0]["slots"],
            "n": len(rows),
        }
    o = make_obs(np.random.default_rng(7))
    key = jax.random.key(123)
    op._rng, fast._rng = key, key
    out["same rng, no noise given"] = diff_stats(
        fast.infer(o)["action"], np.asarray(op.infer(to_openpi(o))["actions"])
    )
    op._rng = key
    ref = np.asarray(op.infer(to_openpi(o))["actions"], np.float32)
    op._rng = key
    got = exact.infer(o)["action"]
    out["exact vs Policy.infer"] = {"bit_identical": bool(np.array_equal(ref, got)), **diff_stats(got, ref)}
    return out


def timing(op: Any, fast: Any, exact: Any, to_openpi: Any, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    obs_list = [make_obs(rng) for _ in range(8)]
    fast.set_max_batch(8)
    t0 = time.perf_counter()
    fast.warmup()
    out: dict[str, Any] = {"fast_warmup_s": round(time.perf_counter() - t0, 2), "compile_s": fast.compile_s}
    out["fast_batch1"] = time_infer(fast, obs_list, n)
    out["fast_batches"] = time_batches(fast, obs_list, [2, 4, 8], max(10, n // 3))
    exact.infer(obs_list[0])
    out["exact_batch1"] = time_infer(exact, obs_list, n)
    wall, own = [], []
    for i in range(n):
        t0 = time.perf_counter()
        r = op.infer(to_openpi(obs_list[i % 8]))
        wall.append((time.perf_counter() - t0) * 1000)
        own.append(r["policy_timing"]["infer_ms"])
    out["openpi_policy_infer"] = {"wall_ms": stats(wall), "own_infer_ms": stats(own)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", default="pi0_aloha_sim")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3, help="observations per equivalence case")
    ap.add_argument("--parts", default="equiv,timing")
    ap.add_argument("--out", default=os.environ.get("OUT", "results/pi0"))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"env": env_info(), "checkpoint": args.checkpoint, "config": args.config}

    def save() -> None:
        (out_dir / "pi0_checkpoint_check.json").write_text(json.dumps(result, indent=2, default=str))

    from pi0remote.policies.pi0 import FastPi0Policy, OpenpiPi0Policy, load_openpi_policy

    t0 = time.perf_counter()
    op, extra = load_openpi_policy(config=args.config, checkpoint=args.checkpoint, num_steps=10, prompt=None)
    result["load_s"] = round(time.perf_counter() - t0, 2)
    fast = FastPi0Policy(op, extra=extra)
    exact = OpenpiPi0Policy(op, extra=extra)
    to_openpi = OpenpiPi0Policy.to_openpi
    print(f"loaded {args.checkpoint} in {result['load_s']} s")
    steps = {
        "equiv": lambda: equivalence(op, fast, exact, to_openpi, args.seeds),
        "floor": lambda: noise_floor(op, to_openpi, args.seeds),
        "rtc": lambda: rtc_part(op, fast, args.n),
        "timing": lambda: timing(op, fast, exact, to_openpi, args.n),
    }
    for name in args.parts.split(","):
        fn = steps.get(name)
        if fn is None:
            continue
        try:
            result[name] = fn()
        except Exception:  # noqa: BLE001 - report and go on with the next part
            result[f"{name}_error"] = traceback.format_exc()
            print(result[f"{name}_error"])
        save()
        print(f"[{name}]", json.dumps(result.get(name), default=str)[:3000])
    return 0


def noise_floor(op: Any, to_openpi: Any, seeds: int) -> dict[str, Any]:
    """How far bf16 reordering alone moves openpi's own actions: the same observation and noise through
    openpi's ``sample_actions`` as a batch of 1 and as item 0 of a batch of 2 (two XLA programs)."""
    import jax
    import jax.numpy as jnp
    from openpi.models import model as _model

    rows = []
    for s in range(seeds):
        rng = np.random.default_rng(2000 + s)
        o = make_obs(rng)
        noise = rng.standard_normal((50, int(op._model.action_dim))).astype(np.float32)
        inputs = op._input_transform(to_openpi(o))
        outs = []
        for b in (1, 2):
            batch = jax.tree.map(lambda x, b=b: jnp.asarray(np.stack([np.asarray(x)] * b)), inputs)
            observation = _model.Observation.from_dict(batch)
            acts = op._sample_actions(
                jax.random.key(0), observation, noise=jnp.asarray(np.stack([noise] * b))
            )
            state = np.asarray(batch["state"][0])
            outs.append(op._output_transform({"state": state, "actions": np.asarray(acts[0])})["actions"])
        rows.append(diff_stats(outs[1], outs[0]))
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in rows])),
        "mean_abs_action": float(np.mean([r["mean_abs_action"] for r in rows])),
        "n": len(rows),
    }


RTC_CASES = ((25, 5), (25, 10), (10, 3))
"""(n, d): prefix length (the unexecuted rest of the previous chunk) and delay steps."""


def rtc_errors(fast: Any, pl: int, d: int, seeds: int) -> dict[str, Any]:
    free_e, guided_e, motion = [], [], []
    for s in range(seeds):
        rng = np.random.default_rng(3000 + 10 * pl + d + 100 * s)
        prev = fast.infer(make_obs(rng), noise=rng.standard_normal((50, fast.action_dim)).astype(np.float32))
        field = {"prefix": prev["action"][-pl:].copy(), "delay_steps": d}
        o = make_obs(rng)
        noise = rng.standard_normal((50, fast.action_dim)).astype(np.float32)
        free = fast.infer(o, noise=noise)["action"]
        guided = fast.infer({**o, "rtc": field}, noise=noise)
        free_e.append(float(np.max(np.abs(free[:d] - field["prefix"][:d]))))
        guided_e.append(float(guided["rtc"]["prefix_error"]))
        motion.append(float(np.mean(np.abs(np.diff(free, axis=0)))))
    return {
        "prefix_error_unguided": float(np.mean(free_e)),
        "prefix_error_guided": float(np.mean(guided_e)),
        "prefix_error_guided_max": max(guided_e),
        "step_to_step_motion": float(np.mean(motion)),
        "n": seeds,
    }


def rtc_part(op: Any, fast: Any, n: int) -> dict[str, Any]:
    """prefix_error with and without guidance; the time of a guided call against an unguided one."""
    out: dict[str, Any] = {"beta": fast.rtc_beta, "schedule": fast.rtc_schedule}
    for pl, d in RTC_CASES:
        out[f"n={pl},d={d}"] = rtc_errors(fast, pl, d, 3)
    rng = np.random.default_rng(9)
    base = [make_obs(rng) for _ in range(8)]
    prev = fast.infer(make_obs(rng))["action"]
    field = {"prefix": prev[-25:].copy(), "delay_steps": 5}
    for b in (1, 8):
        plain = base[:b]
        guided = [{**o, "rtc": field} for o in plain]
        times = {}
        for name, batch in (("unguided", plain), ("guided", guided)):
            fast.infer_batch(batch)
            wall = []
            for _ in range(max(10, n // 2)):
                t0 = time.perf_counter()
                fast.infer_batch(batch)
                wall.append((time.perf_counter() - t0) * 1000)
            times[name] = stats(wall)
        times["ratio_p50"] = round(times["guided"]["p50"] / times["unguided"]["p50"], 3)
        out[f"batch{b}_time_ms"] = times
    return out


if __name__ == "__main__":
    sys.exit(main())
