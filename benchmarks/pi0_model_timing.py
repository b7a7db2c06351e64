"""Time the ``pi0`` policy object on a GPU, without a server: compile, batch-1 latency, batches 1/2/4/8.

Run from the repository root where openpi's source is importable (see benchmarks/pi0_device.sh and docs/pi0.md)::

    PYTHONPATH=src:.openpi_src python benchmarks/pi0_model_timing.py --n 50 --out results/pi0

Parts (each reported even if a later one fails):

1. ``make_pi0_policy(random_weights=True)``: build, ``warmup()`` (compile s), N timed ``infer`` calls
   (``inference_ms`` p50/p95 and wall-clock p50/p95 around ``infer``), then ``infer_batch`` at 1/2/4/8.
2. The same weights with openpi's three ALOHA image slots (two masked), as the checkpoint path computes:
   batch-1 latency, and the largest difference from the one-slot actions for the same noise.
3. openpi's own ``Policy`` around the same weights, with openpi's ALOHA input/output transforms (identity
   normalization, fixed prompt ids in place of the tokenizer): checks that pi0remote's checkpoint adapter returns
   exactly ``Policy.infer``'s actions, and times both (openpi's ``policy_timing.infer_ms`` included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / ".openpi_src"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _import_policies_alone() -> None:
    """Import pi0remote.policies even if the package's own __init__ (client side) cannot load here."""
    try:
        import pi0remote  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        import types

        print(f"note: 'import pi0remote' failed ({exc!r}); loading pi0remote.policies alone")
        pkg = types.ModuleType("pi0remote")
        pkg.__path__ = [str(ROOT / "src" / "pi0remote")]
        sys.modules["pi0remote"] = pkg


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)), 3) if xs else float("nan")


def stats(xs: list[float]) -> dict[str, float]:
    return {"p50": pct(xs, 50), "p95": pct(xs, 95), "min": pct(xs, 0), "n": len(xs)}


def make_obs(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
        "state": rng.uniform(-1, 1, 14).astype(np.float32),
    }


def time_infer(policy: Any, obs_list: list[dict[str, Any]], n: int) -> dict[str, Any]:
    infer_ms, wall_ms, pre, post = [], [], [], []
    for i in range(n):
        obs = obs_list[i % len(obs_list)]
        t0 = time.perf_counter()
        reply = policy.infer(obs)
        wall_ms.append((time.perf_counter() - t0) * 1000)
        infer_ms.append(reply["inference_ms"])
        pre.append(reply["policy_timing"]["preprocess_ms"])
        post.append(reply["policy_timing"]["postprocess_ms"])
        assert reply["action"].shape == (50, 14) and reply["action"].dtype == np.float32
    return {
        "inference_ms": stats(infer_ms),
        "wall_ms": stats(wall_ms),
        "preprocess_ms": stats(pre),
        "postprocess_ms": stats(post),
    }


def time_batches(policy: Any, obs_list: list[dict[str, Any]], sizes: list[int], iters: int) -> dict[str, Any]:
    out = {}
    for b in sizes:
        compile_s = policy.compile(b) if hasattr(policy, "compile") else None
        batch = [obs_list[i % len(obs_list)] for i in range(b)]
        policy.infer_batch(batch)
        wall, dev = [], []
        for _ in range(iters):
            t0 = time.perf_counter()
            replies = policy.infer_batch(batch)
            wall.append((time.perf_counter() - t0) * 1000)
            dev.append(replies[0]["inference_ms"])
            assert len(replies) == b
        out[str(b)] = {
            "compile_s": compile_s,
            "wall_ms": stats(wall),
            "inference_ms": stats(dev),
            "per_item_ms_p50": round(pct(wall, 50) / b, 3),
        }
        print(
            f"  batch {b}: inference_ms p50 {pct(dev, 50):.2f}  wall p50 {pct(wall, 50):.2f}  compile {compile_s}"
        )
    return out


def env_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "numpy", "jaxtyping"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"unavailable: {exc}"
    try:
        import jax

        info["devices"] = [str(d.device_kind) for d in jax.devices()]
    except Exception as exc:  # noqa: BLE001
        info["devices"] = f"unavailable: {exc}"
    return info


def openpi_policy_around(weights: Any, prompt: str = "Transfer cube") -> Any:
    """openpi's Policy with pi0_aloha_sim's transforms, minus what needs downloads (norm stats, tokenizer)."""
    from flax import nnx
    from openpi import transforms as T
    from openpi.policies import aloha_policy
    from openpi.policies import policy as _policy

    from pi0remote.policies.pi0 import RANDOM_PROMPT_TOKENS

    model_config, graphdef, state = weights
    model = nnx.merge(graphdef, state)
    max_len = int(model_config.max_token_len)

    @dataclasses.dataclass(frozen=True)
    class FixedTokens(T.DataTransformFn):
        def __call__(self, data: dict) -> dict:
            data.pop("prompt", None)
            tokens = np.zeros(max_len, np.int32)
            tokens[: len(RANDOM_PROMPT_TOKENS)] = RANDOM_PROMPT_TOKENS
            return {**data, "tokenized_prompt": tokens, "tokenized_prompt_mask": tokens != 0}

    return _policy.Policy(
        model,
        transforms=[
            T.InjectDefaultPrompt(None),
            aloha_policy.AlohaInputs(adapt_to_pi=True),
            T.Normalize(None),
            T.InjectDefaultPrompt(prompt),
            T.ResizeImages(224, 224),
            FixedTokens(),
            T.PadStatesAndActions(model_config.action_dim),
        ],
        output_transforms=[T.Unnormalize(None), aloha_policy.AlohaOutputs(adapt_to_pi=True)],
    )


def openpi_breakdown(op: Any, obs_list: list[dict[str, Any]], n: int) -> dict[str, float]:
    """openpi's Policy.infer, step by step (same steps, each timed; the host copy blocks)."""
    import jax
    import jax.numpy as jnp
    from openpi.models import model as _model

    from pi0remote.policies.pi0 import OpenpiPi0Policy

    steps: dict[str, list[float]] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        steps.setdefault(name, []).append((now - t) * 1000)
        return now

    for i in range(n):
        data = OpenpiPi0Policy.to_openpi(obs_list[i % len(obs_list)])
        t = time.perf_counter()
        inputs = op._input_transform(jax.tree.map(lambda x: x, data))
        t = lap("input_transforms", t)
        inputs = jax.tree.map(lambda x: jnp.asarray(x)[np.newaxis, ...], inputs)
        t = lap("to_device", t)
        op._rng, rng = jax.random.split(op._rng)
        t = lap("rng_split", t)
        observation = _model.Observation.from_dict(inputs)
        t = lap("observation_from_dict", t)
        actions = op._sample_actions(rng, observation, **op._sample_kwargs)
        t = lap("sample_actions_dispatch", t)
        outputs = jax.tree.map(
            lambda x: np.asarray(x[0, ...]), {"state": inputs["state"], "actions": actions}
        )
        t = lap("wait_and_host_copy", t)
        op._output_transform(outputs)
        lap("output_transforms", t)
    return {k: pct(v, 50) for k, v in steps.items()}


def three_slots_part(policy: Any, obs_list: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """The same weights with openpi's three ALOHA image slots (two masked), as openpi's layout computes."""
    import jax

    from pi0remote.policies.pi0 import RandomWeightsPi0Policy

    p3 = RandomWeightsPi0Policy(num_steps=args.num_steps, image_slots=3, weights=policy.weights)
    p3.warmup()
    out: dict[str, Any] = {"compile_s": p3.metadata.extra.get("compile_s")}
    out["batch1"] = time_infer(p3, obs_list, args.n)
    out["batches"] = time_batches(p3, obs_list, [8], args.batch_iters)
    key = jax.random.key(7)
    policy._rng, p3._rng = key, key
    a1 = policy.infer(obs_list[0])["action"]
    a3 = p3.infer(obs_list[0])["action"]
    out["max_abs_diff_vs_one_slot"] = float(np.max(np.abs(a1 - a3)))
    out["max_abs_action"] = float(np.max(np.abs(a1)))
    t = out
    print(
        f"[2] 3 slots: compile {t['compile_s']} s, inference_ms p50 {t['batch1']['inference_ms']['p50']}, "
        f"max |1 slot - 3 slots| {t['max_abs_diff_vs_one_slot']:.3g} (max |a| {t['max_abs_action']:.3g})"
    )
    return out


def adapter_check(
    op: Any, key: Any, ref: np.ndarray, obs_list: list[dict[str, Any]], args: Any, fast: bool
) -> dict[str, Any]:
    """pi0remote's ``--exact`` adapter around openpi's Policy: same actions as ``Policy.infer``? and its timing."""
    from pi0remote.policies.pi0 import OpenpiPi0Policy

    name = "adapter_fast_host" if fast else "adapter_openpi_host"
    adapter = OpenpiPi0Policy(op, extra={"config": "pi0_aloha_sim (random weights)"}, fast_host=fast)
    op._rng = key
    got = adapter.infer(obs_list[0])["action"]
    c: dict[str, Any] = {
        "exact": bool(np.array_equal(ref, got)),
        "max_abs_diff": float(np.max(np.abs(ref - got))),
    }
    # batch: item i against the i-th of sequential openpi calls
    op._rng = key
    seq = [np.asarray(op.infer(OpenpiPi0Policy.to_openpi(o))["actions"], np.float32) for o in obs_list[:4]]
    op._rng = key
    t0 = time.perf_counter()
    bat = [r["action"] for r in adapter.infer_batch(obs_list[:4])]
    c["batch4_first_call_s"] = round(time.perf_counter() - t0, 2)
    c["batch4_max_abs_diff_vs_sequential"] = float(
        max(np.max(np.abs(a - b)) for a, b in zip(seq, bat, strict=True))
    )
    c["batch1"] = time_infer(adapter, obs_list, args.n)
    c["batches"] = time_batches(adapter, obs_list, [4], args.batch_iters)
    ab = c["batch1"]
    print(
        f"[3] {name}: == openpi Policy.infer: {c['exact']} (max diff {c['max_abs_diff']:.3g}); "
        f"batch-4 vs sequential max diff "
        f"{c['batch4_max_abs_diff_vs_sequential']:.3g}"
    )
    print(
        f"[3] {name}: inference_ms p50 {ab['inference_ms']['p50']}, pre p50 {ab['preprocess_ms']['p50']}, "
        f"post p50 {ab['postprocess_ms']['p50']}, wall p50 {ab['wall_ms']['p50']}"
    )
    return c


def openpi_part(policy: Any, obs_list: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """openpi's Policy around the same weights (its own timing and steps), and pi0remote's adapter around it."""
    import jax

    from pi0remote.policies.pi0 import OpenpiPi0Policy

    op = openpi_policy_around(policy.weights)
    key = jax.random.key(11)
    op._rng = key
    t0 = time.perf_counter()
    ref = np.asarray(op.infer(OpenpiPi0Policy.to_openpi(obs_list[0]))["actions"], np.float32)
    check: dict[str, Any] = {"first_call_s": round(time.perf_counter() - t0, 2)}
    check["max_abs_action"] = float(np.max(np.abs(ref)))
    # openpi's own Policy.infer: wall clock vs its policy_timing.infer_ms
    own_ms, own_wall = [], []
    for i in range(args.n):
        data = OpenpiPi0Policy.to_openpi(obs_list[i % len(obs_list)])
        t0 = time.perf_counter()
        r = op.infer(data)
        own_wall.append((time.perf_counter() - t0) * 1000)
        own_ms.append(r["policy_timing"]["infer_ms"])
    check["openpi_policy_infer"] = {"policy_timing_infer_ms": stats(own_ms), "wall_ms": stats(own_wall)}
    print(f"[3] openpi Policy.infer: wall p50 {pct(own_wall, 50)}, its infer_ms p50 {pct(own_ms, 50)}")
    check["openpi_steps_ms"] = openpi_breakdown(op, obs_list, args.n)
    print("[3] openpi Policy.infer steps, p50 ms:", json.dumps(check["openpi_steps_ms"]))
    for fast in (False, True):
        name = "adapter_fast_host" if fast else "adapter_openpi_host"
        check[name] = adapter_check(op, key, ref, obs_list, args, fast)
    return check


def served_part(result: dict[str, Any], obs_list: list[dict[str, Any]], args: Any) -> Any:
    """The random-weights policy as served: build, warm-up, batch-1 timing; returns the policy."""
    _import_policies_alone()
    from pi0remote.policies.pi0 import make_pi0_policy

    t0 = time.perf_counter()
    policy = make_pi0_policy(random_weights=True, num_steps=args.num_steps)
    result["build_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    policy.warmup()
    result["warmup_s"] = round(time.perf_counter() - t0, 2)
    result["compile_s"] = policy.metadata.extra.get("compile_s")
    result["metadata"] = policy.metadata.to_dict()
    print(f"[1] build {result['build_s']} s, warmup {result['warmup_s']} s, compile {result['compile_s']} s")
    result["batch1"] = b1 = time_infer(policy, obs_list, args.n)
    print(
        f"[1] batch 1 x{args.n}: inference_ms p50 {b1['inference_ms']['p50']} p95 {b1['inference_ms']['p95']}; "
        f"wall p50 {b1['wall_ms']['p50']} p95 {b1['wall_ms']['p95']}"
    )
    return policy


def run_part(result: dict[str, Any], name: str, part: str, parts: set[str], fn: Any) -> None:
    """Run one optional part into ``result[name]``; a failure is recorded and the next part still runs."""
    if part not in parts:
        return
    try:
        result[name] = fn()
    except Exception:  # noqa: BLE001
        result[f"{name}_error"] = traceback.format_exc()
        print(result[f"{name}_error"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="timed batch-1 calls")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--batch-iters", type=int, default=20)
    ap.add_argument("--num-steps", type=int, default=10)
    ap.add_argument(
        "--parts",
        default="batches,slots,openpi",
        help="after the batch-1 timing: batches, slots, openpi (comma list)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "results/pi0"), help="folder for pi0_timing.json")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batches.split(",") if x]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"env": env_info(), "n": args.n, "num_steps": args.num_steps}
    print("env:", json.dumps(result["env"]))

    def save() -> None:
        (out_dir / "pi0_timing.json").write_text(json.dumps(result, indent=2, default=str))

    rng = np.random.default_rng(0)
    obs_list = [make_obs(rng) for _ in range(8)]

    policy = served_part(result, obs_list, args)
    b1 = result["batch1"]
    save()
    parts = set(args.parts.split(","))
    result["batches"] = time_batches(policy, obs_list, sizes, args.batch_iters) if "batches" in parts else {}
    save()

    run_part(result, "three_slots", "slots", parts, lambda: three_slots_part(policy, obs_list, args))
    save()
    run_part(result, "openpi_check", "openpi", parts, lambda: openpi_part(policy, obs_list, args))
    save()

    print("\nsummary (ms, p50):")
    print(
        f"  compile_s {result['compile_s']}  batch1 inference_ms {b1['inference_ms']['p50']}  "
        f"wall {b1['wall_ms']['p50']}"
    )
    for b, r in result["batches"].items():
        print(
            f"  batch {b}: inference_ms {r['inference_ms']['p50']}  wall {r['wall_ms']['p50']}  "
            f"per item {r['per_item_ms_p50']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
