"""Videos of evaluation episodes: one MP4 per episode and mode, and side-by-side comparisons.

Each episode runs through the same loop as the evaluation (:func:`~.eval.run_episode`); a step
callback renders the top camera, annotates it (mode, step, last round trip) and appends it to the
episode's MP4 at 50 fps (one frame per control step: simulated time).

With several modes, a side-by-side MP4 per seed is drawn on the *robot clock* of
:class:`~.eval.SyncExecutor`: each step takes ``dt`` and each request its measured round trip, during
which the robot stands still. Every pane advances at that wall-clock pace, so a slow link visibly
freezes its robot between chunks and finishes later.

MP4s are written with imageio and its bundled ffmpeg (``imageio-ffmpeg``).
"""

from __future__ import annotations

import bisect
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .eval import (
    EpisodeResult,
    EvalConfig,
    Reply,
    ResultsWriter,
    SyncExecutor,
    aggregate,
    open_policy,
    run_episode,
)

VIDEO_FPS = 50
COMPARE_FPS = 25


@dataclass
class Frame:
    image: np.ndarray
    """Downscaled pane, uint8[240, 320, 3]."""
    step: int
    latency_ms: float | None
    time_s: float
    """Robot-clock time at which this frame becomes current."""


@dataclass
class Recording:
    mode: str
    seed: int
    frames: list[Frame] = field(default_factory=list)
    result: EpisodeResult | None = None

    def at(self, t: float) -> Frame:
        """The frame showing at robot time ``t`` (the first one before the episode starts)."""
        times = [f.time_s for f in self.frames]
        return self.frames[max(bisect.bisect_right(times, t) - 1, 0)]


def slug(mode: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", mode).strip("_") or "policy"


def annotate(image: np.ndarray, lines: list[str], scale: int = 1) -> np.ndarray:
    """Draw text lines on a dark band at the top left of a copy of ``image``."""
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    try:
        font = ImageFont.load_default(size=11 * scale)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    height = (13 * scale) * len(lines) + 6
    width = max(int(draw.textlength(s, font=font)) for s in lines) + 10
    draw.rectangle([0, 0, width, height], fill=(0, 0, 0))
    for i, text in enumerate(lines):
        draw.text((5, 3 + i * 13 * scale), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def downscale(image: np.ndarray) -> np.ndarray:
    """Halve both sides by averaging 2x2 blocks (480x640 -> 240x320)."""
    h, w, c = image.shape
    return (
        image[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3)).astype(np.uint8)
    )


def _latency_text(ms: float | None) -> str:
    return "latency -" if ms is None else f"latency {ms:.1f} ms"


def record_episode(
    client: Any, env: Any, seed: int, cfg: EvalConfig, path: Path, *, mode: str, episode: int = 0,
) -> Recording:  # fmt: skip
    """Run one episode, writing its annotated MP4 to ``path``; returns the downscaled frames. A progress
    bar counts its steps (rendering and encoding make a step cost tens of milliseconds)."""
    import imageio.v2 as imageio
    from tqdm import tqdm

    executor = SyncExecutor()
    rec = Recording(mode=mode, seed=seed)
    with imageio.get_writer(path, fps=VIDEO_FPS, codec="libx264", quality=7, macro_block_size=16) as video:

        def on_step(env: Any, step: int, reward: float, reply: Reply | None) -> None:
            frame = env.render()
            latency = None if reply is None else reply.round_trip_ms
            video.append_data(
                annotate(frame, [mode, f"step {step}  reward {reward:.0f}", _latency_text(latency)], 2)
            )
            rec.frames.append(Frame(downscale(frame), step, latency, executor.robot_time_s))

        desc = f"{mode} seed {seed}"
        with tqdm(total=cfg.max_steps, desc=desc, unit="step", leave=False, file=sys.stderr) as bar:
            rec.result = run_episode(
                client, env, seed, cfg, mode=mode, episode=episode, executor=executor, on_step=on_step,
                progress=bar,
            )  # fmt: skip
    return rec


def compose_side_by_side(recordings: list[Recording], path: Path, fps: int = COMPARE_FPS) -> int:
    """One MP4 with a pane per mode, all on the robot clock; returns the number of frames written."""
    import imageio.v2 as imageio
    from tqdm import tqdm

    end = max(r.frames[-1].time_s for r in recordings) + 0.5
    n = int(np.ceil(end * fps))
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=16) as video:
        for i in tqdm(range(n), desc="side by side", unit="frame", leave=False, file=sys.stderr):
            t = i / fps
            panes = [_pane(r, t) for r in recordings]
            video.append_data(np.concatenate(panes, axis=1))
    return n


def _pane(rec: Recording, t: float) -> np.ndarray:
    frame = rec.at(t)
    done = t >= rec.frames[-1].time_s
    status = ""
    if done and rec.result is not None:
        status = "  SUCCESS" if rec.result.success else "  failed"
    lines = [rec.mode, f"t {t:5.2f} s  step {frame.step}{status}", _latency_text(frame.latency_ms)]
    return annotate(frame.image, lines)


def record(
    modes: list[str], cfg: EvalConfig, clients: dict[str, Any] | None = None
) -> tuple[Path, list[dict]]:
    """Record ``cfg.episodes`` seeds for every mode; with several modes, a side-by-side video per seed."""
    from tqdm import tqdm

    from ..sim.env import make_env

    writer = ResultsWriter(cfg.out, {**asdict(cfg), "modes": modes})
    opened = {m: (clients or {}).get(m) or open_policy(m) for m in modes}
    results: dict[str, list[EpisodeResult]] = {m: [] for m in modes}
    try:
        with make_env(cfg.task, render=False, max_steps=cfg.max_steps) as env:
            for i in tqdm(range(cfg.episodes), desc="episodes", unit="ep", file=sys.stderr):
                seed = cfg.seed + i
                recs = []
                for mode in modes:
                    path = writer.dir / f"{slug(mode)}_seed{seed}.mp4"
                    rec = record_episode(opened[mode], env, seed, cfg, path, mode=mode, episode=i)
                    writer.episode(rec.result)
                    results[mode].append(rec.result)
                    recs.append(rec)
                    tqdm.write(f"{path}  ({len(rec.frames)} frames)")
                if len(recs) > 1:
                    path = writer.dir / f"compare_seed{seed}.mp4"
                    compose_side_by_side(recs, path)
                    tqdm.write(f"{path}")
    finally:
        for m, client in opened.items():
            if m not in (clients or {}) and hasattr(client, "close"):
                client.close()
    aggregates = [aggregate(m, results[m]) for m in modes]
    table = writer.finish(aggregates)
    print(f"\n{table}\n\nvideos and results: {writer.dir}")
    return writer.dir, aggregates
