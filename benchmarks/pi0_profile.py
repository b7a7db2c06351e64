"""Where one π₀ call's GPU time goes, and which compile options cut it (a GPU-machine script).

    PYTHONPATH=src:.openpi_src python benchmarks/pi0_profile.py --out results/pi0_profile [--parts ...]

Builds π₀ with random bf16 weights (openpi's ``Pi0Config``, the checkpoint path's compute: one camera slot,
the prefix KV fill, 10 flow steps), then, each part reported even if a later one fails:

* ``layers``: the serving path's split layers (``pi0remote.policies.pi0_layers``): the whole call, the prefix
  and prefix + one step, and the largest difference from openpi's scanned modules for the same inputs and noise;
* ``split``: openpi's scanned modules: the whole call, the prefix alone and one flow step alone (p50 ms, ``block_until_ready``), and the
  host time to dispatch the call (until the compiled function returns, before the result is ready);
* ``tokens``: the whole call with the prompt padded to 48 tokens (openpi's ``max_token_len``) and trimmed to 16;
* ``options``: the whole call compiled with each set of XLA options in ``VARIANTS`` (one process, one model);
* ``trace``: a profiler trace of a few calls per variant (``default``, ``split``, or any in ``VARIANTS``), summarised per kernel
  (count, total GPU time, GPU busy time against wall time per call).

Results go to ``OUT/profile.json`` as each part finishes; the last lines printed are a short table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / ".openpi_src"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))

CB_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cmdbuf_while": {"xla_gpu_enable_command_buffer": CB_ALL},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    "dyn_slice_fusion": {"xla_gpu_enable_dynamic_slice_fusion": True},
    "cublaslt": {"xla_gpu_enable_cublaslt": True},
    "unroll_loops": {"xla_gpu_enable_while_loop_unrolling": "WHILE_LOOP_UNROLLING_FULL_UNROLL"},
    "unroll+cmdbuf_while": {
        "xla_gpu_enable_while_loop_unrolling": "WHILE_LOOP_UNROLLING_FULL_UNROLL",
        "xla_gpu_enable_command_buffer": CB_ALL,
    },
}


def p50(xs: list[float]) -> float:
    return round(float(np.median(xs)), 3)


class _Bound:
    """A compiled call with its layers argument bound: ``f(params, *inputs)``."""

    def __init__(self, compiled: Any, layers: Any) -> None:
        self.compiled, self.layers = compiled, layers

    def __call__(self, params: Any, *args: Any) -> Any:
        return self.compiled(params, self.layers, *args)


class Rig:
    """One random-weights π₀ and jitted pieces of the fast path's call over it."""

    def __init__(self, seed: int = 0, small: bool = False) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from pi0remote.policies.pi0_common import _import_openpi
        from pi0remote.policies.pi0_random import cast_floating

        model_mod, pi0_config = _import_openpi("openpi.models.model", "openpi.models.pi0_config")

        self.jax, self.jnp, self.nnx, self.model_mod = jax, jnp, nnx, model_mod
        t0 = time.perf_counter()
        variants = {"paligemma_variant": "dummy", "action_expert_variant": "dummy"} if small else {}
        self.config = pi0_config.Pi0Config(**variants)
        model = self.config.create(jax.random.key(seed))
        self.graphdef, state = nnx.split(model)
        del model
        self.params = cast_floating(jax, jnp, state, jnp.bfloat16)
        self.build_s = round(time.perf_counter() - t0, 1)
        self.leaves = len(jax.tree.leaves(self.params))
        from pi0remote.policies import pi0_layers

        t0 = time.perf_counter()
        self.layers = pi0_layers.prepare(self.params)  # the serving path's per-layer weights
        self.prepare_s = round(time.perf_counter() - t0, 2)
        self.n = 40

    def inputs(
        self, batch: int = 1, token_len: int = 48, real_len: int = 12, seed: int = 0
    ) -> tuple[Any, ...]:
        rng = np.random.default_rng(seed)
        cam = rng.integers(0, 256, (batch, 3, 224, 224), dtype=np.uint8)
        state = rng.uniform(-1, 1, (batch, 32)).astype(np.float32)
        noise = rng.standard_normal((batch, 50, 32)).astype(np.float32)
        tokens = rng.integers(1, 1000, (batch, 48)).astype(np.int32)[
            :, :token_len
        ]  # the same ids at any length
        mask = np.zeros((batch, token_len), bool)
        mask[:, : min(real_len, token_len)] = True
        return self.jax.device_put((cam, state, tokens, mask, noise))

    def _obs(self, cam: Any, state: Any, tokens: Any, mask: Any) -> Any:
        from pi0remote.policies import pi0_engine as engine

        jnp = self.jnp
        images = {"base_0_rgb": engine.device_image(cam)}
        obs = self.model_mod.Observation(
            images=images,
            image_masks={"base_0_rgb": jnp.ones((cam.shape[0],), bool)},
            state=state,
            tokenized_prompt=tokens,
            tokenized_prompt_mask=mask,
        )
        return self.model_mod.preprocess_observation(None, obs, train=False, image_keys=("base_0_rgb",))

    def fn(self, part: str, split: bool = False) -> Any:
        """``full``: cameras to actions; ``prefix``: the KV fill alone; ``step``: the fill and one velocity
        call. ``split``: through ``pi0_layers`` (the serving path) instead of openpi's scanned modules."""
        from pi0remote.policies import pi0_engine as engine
        from pi0remote.policies import pi0_layers

        nnx, graphdef = self.nnx, self.graphdef

        def full(params, layers, cam, state, tokens, mask, noise):  # noqa: ANN001 - traced
            model = nnx.merge(graphdef, params)
            obs = self._obs(cam, state, tokens, mask)
            if split:
                kv, pmask = pi0_layers.prefill(model, layers, obs)
            else:
                kv, pmask = engine.prefill(model, obs)
            if part == "prefix":
                return kv
            if split:
                v = pi0_layers.velocity_fn(model, layers, obs, kv, pmask)
            else:
                v = engine.velocity_fn(model, obs, kv, pmask)
            if part == "step":
                return v(noise, 1.0)
            return engine.flow_sample(v, noise, 10).astype(self.jnp.float32)

        return self.jax.jit(full)

    def compile(
        self, part: str, args: tuple[Any, ...], options: dict[str, Any] | None = None, split: bool = False
    ) -> tuple[Any, float]:
        t0 = time.perf_counter()
        lowered = self.fn(part, split).lower(self.params, self.layers if split else None, *args)
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
        return _Bound(compiled, self.layers if split else None), round(time.perf_counter() - t0, 2)

    def time(self, compiled: Any, args: tuple[Any, ...], n: int | None = None) -> dict[str, float]:
        jax = self.jax
        n = n or self.n
        for _ in range(2):
            jax.block_until_ready(compiled(self.params, *args))
        total, dispatch = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            out = compiled(self.params, *args)
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            t2 = time.perf_counter()
            dispatch.append((t1 - t0) * 1e3)
            total.append((t2 - t0) * 1e3)
        return {"p50_ms": p50(total), "min_ms": round(min(total), 3), "dispatch_p50_ms": p50(dispatch)}


def _time_parts(rig: Rig, args: tuple[Any, ...], res: dict[str, Any], split: bool) -> np.ndarray:
    """Time the whole call, the prefix and prefix + one step into ``res``; returns the whole call's actions."""
    out = None
    for part in ("full", "prefix", "step"):
        compiled, secs = rig.compile(part, args, split=split)
        res[part] = {**rig.time(compiled, args), "compile_s": secs}
        if part == "full":
            out = np.asarray(compiled(rig.params, *args))
        print("layers" if split else "openpi", part, res[part], flush=True)
    return out


def part_split(rig: Rig, res: dict[str, Any]) -> None:
    out = _time_parts(rig, rig.inputs(), res, split=False)
    res["full"]["mean_abs_action"] = round(float(np.abs(out).mean()), 4)


def part_layers(rig: Rig, res: dict[str, Any]) -> None:
    """The split layers (the serving path) against openpi's scanned modules, same inputs and noise."""
    args = rig.inputs(token_len=48, real_len=12, seed=1)
    ref = np.asarray(rig.compile("full", args)[0](rig.params, *args))
    res["prepare_s"] = rig.prepare_s
    out = _time_parts(rig, args, res, split=True)
    res["full"].update(
        max_abs_diff_vs_openpi=float(np.abs(out - ref).max()),
        mean_abs_diff_vs_openpi=float(np.abs(out - ref).mean()),
        mean_abs_action=float(np.abs(ref).mean()),
    )


def part_tokens(rig: Rig, res: dict[str, Any]) -> None:
    ref = None
    for length in (48, 32, 16):
        args = rig.inputs(token_len=length, real_len=12)
        compiled, secs = rig.compile("full", args)
        out = np.asarray(compiled(rig.params, *args))
        ref = out if ref is None else ref
        res[f"tokens_{length}"] = {
            **rig.time(compiled, args),
            "max_abs_diff_vs_48": float(np.abs(out - ref).max()),
        }
        print("tokens", length, res[f"tokens_{length}"], flush=True)


def part_options(rig: Rig, res: dict[str, Any], names: list[str]) -> None:
    args = rig.inputs()
    ref = None
    for name in names:
        try:
            compiled, secs = rig.compile("full", args, VARIANTS[name])
            out = np.asarray(compiled(rig.params, *args))
            ref = out if ref is None else ref
            res[name] = {
                **rig.time(compiled, args),
                "compile_s": secs,
                "max_abs_diff": float(np.abs(out - ref).max()),
            }
        except Exception as exc:  # noqa: BLE001 - an option this XLA lacks is a result too
            res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("options", name, res[name], flush=True)


def summarize_trace(trace_dir: Path, calls: int) -> dict[str, Any]:
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        return {"error": f"no trace file under {trace_dir}"}
    data = json.loads(gzip.open(files[-1]).read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n or "device" in n.lower()}
    kern = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and e.get("dur") is not None]
    by: dict[str, list[float]] = {}
    for e in kern:
        by.setdefault(e["name"], []).append(float(e["dur"]))
    top = sorted(by.items(), key=lambda kv: -sum(kv[1]))[:40]
    busy = sum(sum(v) for v in by.values()) / 1e3 / calls
    span = (max(e["ts"] + e["dur"] for e in kern) - min(e["ts"] for e in kern)) / 1e3 if kern else 0.0
    return {
        "file": str(files[-1]),
        "processes": sorted(set(names.values()))[:20],
        "kernels_per_call": round(len(kern) / calls, 1),
        "gpu_busy_ms_per_call": round(busy, 3),
        "span_ms_all_calls": round(span, 3),
        "top": [
            {"name": k[:120], "count": len(v) / calls, "total_ms": round(sum(v) / 1e3 / calls, 4)}
            for k, v in top
        ],
    }


def part_trace(rig: Rig, res: dict[str, Any], out: Path, variant: str) -> None:
    """``variant``: a name in VARIANTS, or ``split`` (the serving path's layers)."""
    jax = rig.jax
    args = rig.inputs()
    split = variant == "split"
    compiled, _ = rig.compile("full", args, VARIANTS.get(variant) or None, split=split)
    rig.time(compiled, args, n=3)
    tdir = Path(tempfile.gettempdir()) / "pi0_profile_traces" / variant.replace("+", "_")
    calls = 3
    with jax.profiler.trace(str(tdir), create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(compiled(rig.params, *args))
    res[variant] = summarize_trace(tdir, calls)
    r = res[variant]
    print(
        "trace",
        variant,
        {k: r.get(k) for k in ("kernels_per_call", "gpu_busy_ms_per_call", "error")},
        flush=True,
    )
    for row in r.get("top", [])[:25]:
        print(f"  {row['total_ms']:8.3f} ms  x{row['count']:6.1f}  {row['name']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/pi0_profile")
    ap.add_argument("--parts", default="layers,split,tokens,options,trace")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--trace-variants", default="default,split")
    ap.add_argument("--n", type=int, default=40, help="timed calls per measurement")
    ap.add_argument("--small", action="store_true", help="openpi's dummy Gemma sizes (a CPU smoke run)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rig = Rig(small=args.small)
    rig.n = args.n
    import jax

    results: dict[str, Any] = {"build_s": rig.build_s, "param_leaves": rig.leaves, "jax": jax.__version__}
    print("built", results, flush=True)
    parts = args.parts.split(",")
    steps = {
        "layers": lambda r: part_layers(rig, r),
        "split": lambda r: part_split(rig, r),
        "tokens": lambda r: part_tokens(rig, r),
        "options": lambda r: part_options(rig, r, args.variants.split(",")),
        "trace": lambda r: [part_trace(rig, r, out, v) for v in args.trace_variants.split(",")],
    }
    for name in parts:
        results[name] = {}
        try:
            steps[name](results[name])
        except Exception:  # noqa: BLE001 - report and go on to the next part
            results[name]["error"] = traceback.format_exc()[-2000:]
            print(results[name]["error"], flush=True)
        (out / "profile.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n== summary (p50 ms)")
    for name in ("layers", "split", "tokens", "options"):
        for k, v in results.get(name, {}).items():
            if isinstance(v, dict):
                print(
                    f"{name:8s} {k:22s} {v.get('p50_ms', v.get('error', ''))}  dispatch {v.get('dispatch_p50_ms', '')}"
                )


if __name__ == "__main__":
    main()
