"""Write a π₀ checkpoint in openpi's layout, with random bf16 weights, where nothing can be downloaded.

    python benchmarks/make_pi0_checkpoint.py OUT_DIR [--config pi0_aloha_sim] [--seed 0] [--norm-stats random|unit]

Writes what openpi's ``create_trained_policy(get_config(config), OUT_DIR)`` reads:

* ``OUT_DIR/params``: the config's model (``train_config.model.create(key(seed))``), floating parameters cast to
  bfloat16, saved with orbax's ``PyTreeCheckpointer`` as ``{"params": pure_dict}`` (openpi's release layout);
* ``OUT_DIR/assets/<asset_id>/norm_stats.json`` through openpi's own ``normalize.save``: ``random`` (default)
  draws per-dimension means and spreads (so that normalization shows in the actions), ``unit`` writes mean 0,
  std 1, q01 -1, q99 1;
* when openpi's cache (``$OPENPI_DATA_HOME``, default ``~/.cache/openpi``) has no PaliGemma tokenizer, a small
  sentencepiece model at ``big_vision/paligemma_tokenizer.model`` with PaliGemma's special ids (pad 0, eos 1,
  bos 2, unk 3), so that openpi's ``PaligemmaTokenizer`` loads without a download. An existing file is kept.

Run where openpi imports (see docs/pi0.md, route C): ``PYTHONPATH=src:.openpi_src``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / ".openpi_src"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))

SENTENCES = [
    "Transfer cube",
    "transfer the cube to the other arm",
    "pick up the red cube",
    "insert the peg into the socket",
    "fold the towel",
    "open the drawer and put the block inside",
    "stack the cubes",
    "warm up",
    "probe",
]


def tokenizer_path() -> Path:
    from openpi.shared import download

    return download.get_cache_dir() / "big_vision" / "paligemma_tokenizer.model"


def write_tokenizer(path: Path) -> bool:
    """Train a tiny sentencepiece model with PaliGemma's special ids; False if one is there already."""
    if path.exists():
        return False
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=buf,
        vocab_size=64,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return True


def asset_id_of(train_config: Any) -> str:
    data = train_config.data
    assets = getattr(data, "assets", None)
    asset_id = getattr(assets, "asset_id", None) or getattr(data, "repo_id", None)
    if not isinstance(asset_id, str):
        raise SystemExit(f"config {train_config.name!r} names no asset id for its norm stats")
    return asset_id


def norm_stats(kind: str, dim: int, seed: int) -> dict[str, Any]:
    from openpi.shared.normalize import NormStats

    rng = np.random.default_rng(seed)

    def one() -> NormStats:
        if kind == "unit":
            mean, std = np.zeros(dim), np.ones(dim)
            return NormStats(mean=mean, std=std, q01=-np.ones(dim), q99=np.ones(dim))
        mean, std = rng.uniform(-0.3, 0.3, dim), rng.uniform(0.3, 1.0, dim)
        return NormStats(mean=mean, std=std, q01=mean - 2 * std, q99=mean + 2 * std)

    return {"state": one(), "actions": one()}


def save_params(path: Path, params: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            ckptr.save(path, {"params": params})
        except TypeError:  # orbax versions that take only typed args
            ckptr.save(path, args=ocp.args.PyTreeSave({"params": params}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--config", default="pi0_aloha_sim")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--norm-stats", choices=("random", "unit"), default="random")
    ap.add_argument("--stats-dim", type=int, default=14, help="dims of the norm stats (ALOHA: 14)")
    args = ap.parse_args()
    out: Path = args.out_dir.resolve()
    if (out / "params").exists():
        raise SystemExit(f"{out / 'params'} exists; pick a new OUT_DIR")

    from pi0remote.policies.pi0_common import _import_openpi
    from pi0remote.policies.pi0_random import cast_floating

    jax, jnp, nnx, config_mod, normalize = _import_openpi(
        "jax", "jax.numpy", "flax.nnx", "openpi.training.config", "openpi.shared.normalize"
    )
    report: dict[str, Any] = {"config": args.config, "out_dir": str(out)}
    report["tokenizer_written"] = write_tokenizer(tokenizer_path())
    report["tokenizer"] = str(tokenizer_path())
    train_config = config_mod.get_config(args.config)
    t0 = time.perf_counter()
    model = train_config.model.create(jax.random.key(args.seed))
    _, state = nnx.split(model)
    del model
    state = cast_floating(jax, jnp, state, jnp.bfloat16)
    params = state.to_pure_dict()
    report["create_s"] = round(time.perf_counter() - t0, 2)
    report["parameters"] = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
    t0 = time.perf_counter()
    save_params(out / "params", params)
    report["save_s"] = round(time.perf_counter() - t0, 2)
    asset_id = asset_id_of(train_config)
    normalize.save(out / "assets" / asset_id, norm_stats(args.norm_stats, args.stats_dim, args.seed + 1))
    report["norm_stats"] = str(out / "assets" / asset_id / "norm_stats.json")
    print(json.dumps(report, indent=2))
    (out / "make_pi0_checkpoint.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
