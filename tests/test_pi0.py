"""The ``pi0`` policy's adapter around openpi, tested on the CPU.

openpi cannot be installed in CI, so these tests run the adapter against ``tests/fake_openpi``: a stand-in
package that honours the same contract as openpi's policy factory (``get_config`` +
``create_trained_policy``) and ``Policy.infer`` (see its README), including results that become ready only after
``sample_actions`` has returned, as JAX's asynchronous dispatch does. The random-weights path needs openpi's real
model and a GPU; ``benchmarks/pi0_model_timing.py`` covers it (docs/pi0.md has the figures).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from pi0remote.errors import InvalidInputError
from pi0remote.policies import load_policy
from pi0remote.policies import pi0 as pi0_mod

FAKE = Path(__file__).parent / "fake_openpi"


@pytest.fixture
def fake(monkeypatch):
    """Put the stand-in openpi first on sys.path (plus the numpy jax stand-in where jax is absent), and the
    stand-in flax.nnx (split/merge of the stand-in model) in sys.modules."""
    need_jax = importlib.util.find_spec("jax") is None
    stubbed = ("openpi", "jax") if need_jax else ("openpi",)
    for name in list(sys.modules):
        if name.split(".")[0] == "openpi":
            monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(FAKE))
    if need_jax:
        monkeypatch.syspath_prepend(str(FAKE / "_nojax"))
    spec = importlib.util.spec_from_file_location("flax", FAKE / "_noflax" / "flax" / "__init__.py")
    flax = importlib.util.module_from_spec(spec)
    nnx_spec = importlib.util.spec_from_file_location("flax.nnx", FAKE / "_noflax" / "flax" / "nnx.py")
    nnx = importlib.util.module_from_spec(nnx_spec)
    nnx_spec.loader.exec_module(nnx)
    flax.nnx = nnx
    monkeypatch.setitem(sys.modules, "flax", flax)
    monkeypatch.setitem(sys.modules, "flax.nnx", nnx)
    policy_config = importlib.import_module("openpi.policies.policy_config")
    policy_mod = importlib.import_module("openpi.policies.policy")
    policy_config.CREATED.clear()
    policy_config.SEEN_INPUTS.clear()
    policy_mod.DEVICE_DELAY_S = 0.0
    yield policy_config, policy_mod
    for name in set(sys.modules) - before:
        if name.split(".")[0] in stubbed:
            del sys.modules[name]


def exact(**kw):
    return pi0_mod.make_pi0_policy(exact=True, **kw)


def obs(seed: int = 0, **extra):
    rng = np.random.default_rng(seed)
    o = {
        "cam_high": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
        "state": rng.uniform(-1, 1, 14).astype(np.float32),
    }
    o.update(extra)
    return o


# --- openpi missing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_weights", [False, True])
def test_missing_openpi_says_how_to_install(monkeypatch, random_weights):
    monkeypatch.setitem(sys.modules, "openpi", None)  # as if not installed, even where it is
    with pytest.raises(ImportError) as info:
        pi0_mod.make_pi0_policy(random_weights=random_weights)
    msg = str(info.value)
    assert isinstance(info.value, pi0_mod.OpenpiNotInstalledError)
    assert f"git+https://github.com/Physical-Intelligence/openpi@{pi0_mod.OPENPI_COMMIT}" in msg
    assert "subdirectory=packages/openpi-client" in msg
    assert "not on the package index" in msg and "docs/pi0.md" in msg


def test_missing_openpi_dependency_names_it(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "openpi.training.config", None)
    with pytest.raises(pi0_mod.OpenpiNotInstalledError) as info:
        pi0_mod.make_pi0_policy()
    assert "openpi.training.config" in str(info.value)
    assert pi0_mod.OPENPI_COMMIT in str(info.value)


# --- loading through openpi's factory ------------------------------------------------------------------------


def test_default_checkpoint_goes_through_openpi_factory(fake):
    policy_config, _ = fake
    policy = pi0_mod.make_pi0_policy()
    call = policy_config.CREATED[-1]
    assert call["train_config"].name == "pi0_aloha_sim"
    assert call["checkpoint_dir"] == "gs://openpi-assets/checkpoints/pi0_aloha_sim"
    assert call["default_prompt"] is None
    assert call["sample_kwargs"] is None  # openpi's own 10 steps, the very call openpi serves
    assert isinstance(policy, pi0_mod.FastPi0Policy)
    assert policy.metadata.extra["path"] == "fast"
    assert exact().metadata.extra["path"] == "exact"
    # the stand-in model has no stacked Gemma layers: openpi's modules serve, and the metadata says why
    assert policy.metadata.extra["layers"].startswith("openpi (") and policy._layers is None


def test_options_reach_openpi_factory(fake):
    policy_config, _ = fake
    pi0_mod.make_pi0_policy(checkpoint="/data/ckpt", num_steps=5, prompt="Transfer cube", unknown_option=1)
    call = policy_config.CREATED[-1]
    assert call["checkpoint_dir"] == "/data/ckpt"
    assert call["sample_kwargs"] == {"num_steps": 5}
    assert call["default_prompt"] == "Transfer cube"


def test_unknown_config_is_openpis_error(fake):
    with pytest.raises(ValueError, match="not found"):
        pi0_mod.make_pi0_policy(config="no_such_config")


def test_load_policy_builds_pi0(fake):
    policy = load_policy("pi0", config="pi0_aloha_sim", num_steps=10)
    assert isinstance(policy, pi0_mod.FastPi0Policy)
    assert isinstance(load_policy("pi0", exact=True), pi0_mod.OpenpiPi0Policy)


def test_metadata(fake):
    policy = pi0_mod.make_pi0_policy(num_steps=7, prompt="Transfer cube")
    meta = policy.metadata
    assert meta.name == "pi0"
    assert meta.action_shape == (50, 14) and meta.action_horizon == 50
    assert {k: (v.dtype, v.shape) for k, v in meta.input_spec.items()} == {
        "cam_high": ("uint8", (3, 224, 224)),
        "state": ("float32", (14,)),
    }
    extra = meta.to_dict()
    assert extra["config"] == "pi0_aloha_sim"
    assert extra["checkpoint"] == "gs://openpi-assets/checkpoints/pi0_aloha_sim"
    assert extra["num_steps"] == 7 and extra["random_weights"] is False
    assert extra["device"] and extra["openpi_commit"] == pi0_mod.OPENPI_COMMIT
    # the suite turns pi0remote's default off (conftest); jax's own setting would still win
    assert extra["compile_cache"] == (os.environ.get("JAX_COMPILATION_CACHE_DIR") or None)


@pytest.fixture
def jax_cache_setting():
    """jax's compilation-cache directory, put back after the test."""
    jax = pytest.importorskip("jax")
    before = jax.config.jax_compilation_cache_dir
    yield jax
    jax.config.update("jax_compilation_cache_dir", before)


def test_compile_cache_rules(jax_cache_setting, tmp_path):
    from pi0remote.policies.pi0_common import use_compile_cache

    jax = jax_cache_setting
    jax.config.update("jax_compilation_cache_dir", None)
    assert use_compile_cache({"PI0REMOTE_JAX_CACHE": "off"}) is None
    assert jax.config.jax_compilation_cache_dir is None
    home = tmp_path / "xdg"
    assert use_compile_cache({"XDG_CACHE_HOME": str(home)}) == str(home / "pi0remote" / "jax")
    assert (home / "pi0remote" / "jax").is_dir()
    assert jax.config.jax_compilation_cache_dir == str(home / "pi0remote" / "jax")
    # a directory already set (JAX_COMPILATION_CACHE_DIR, or a caller) wins over ours
    assert use_compile_cache({"PI0REMOTE_JAX_CACHE": str(tmp_path / "other")}) == str(
        home / "pi0remote" / "jax"
    )
    jax.config.update("jax_compilation_cache_dir", None)
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert use_compile_cache({"PI0REMOTE_JAX_CACHE": str(blocked / "sub")}) is None


def test_compile_cache_reaches_metadata(fake, jax_cache_setting, monkeypatch, tmp_path):
    jax_cache_setting.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("PI0REMOTE_JAX_CACHE", str(tmp_path / "jc"))
    assert pi0_mod.make_pi0_policy().metadata.to_dict()["compile_cache"] == str(tmp_path / "jc")


def test_compile_cache_keeps_compiled_programs(tmp_path):
    """In a fresh process (jax reads the setting at its first compile), a compile leaves an entry there."""
    pytest.importorskip("jax")
    import subprocess

    code = (
        "from pi0remote.policies.pi0_common import use_compile_cache; import jax; "
        "print(use_compile_cache()); print(jax.jit(lambda x: x * 3 + 1)(2.0))"
    )
    env = {
        **os.environ,
        "PI0REMOTE_JAX_CACHE": str(tmp_path / "jc"),
        "JAX_PLATFORMS": "cpu",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "jc"), "7.0"]
    assert any((tmp_path / "jc").iterdir())


def test_pytorch_port_is_stubbed_only_when_it_cannot_import(fake):
    exact()
    stub = sys.modules["openpi.models_pytorch.pi0_pytorch"]
    with pytest.raises(ImportError, match="only JAX checkpoints"):
        stub.PI0Pytorch  # noqa: B018


# --- the request mapping and the actions ---------------------------------------------------------------------


def test_request_maps_to_openpis_aloha_input(fake):
    policy_config, _ = fake
    policy = exact()
    o = obs(1, prompt="Transfer cube", cam_left_wrist=obs(2)["cam_high"], episode=3)
    policy.infer(o)
    seen = policy_config.SEEN_INPUTS[-1]
    assert set(seen) == {"images", "state", "prompt"}
    assert set(seen["images"]) == {"cam_high", "cam_left_wrist"}
    assert seen["images"]["cam_high"] is o["cam_high"]  # CHW uint8, no copy, openpi's transforms do the rest
    assert seen["state"] is o["state"]
    assert seen["prompt"] == "Transfer cube"


def test_prompt_is_optional(fake):
    policy_config, _ = fake
    policy = exact()
    policy.infer(obs())
    assert "prompt" not in policy_config.SEEN_INPUTS[-1]  # openpi injects the config's default prompt


def test_actions_are_exactly_openpis(fake):
    policy = exact()
    reference = exact().openpi_policy  # a fresh openpi Policy, same rng
    for seed in range(3):
        o = obs(seed, prompt="Transfer cube")
        reply = policy.infer(o)
        expected = reference.infer(pi0_mod.OpenpiPi0Policy.to_openpi(o))["actions"]
        assert reply["action"].dtype == np.float32 and reply["action"].shape == (50, 14)
        np.testing.assert_array_equal(reply["action"], expected.astype(np.float32))


def test_openpi_infer_fallback_gives_the_same_actions(fake):
    policy_config, _ = fake
    policy = exact()
    opaque = exact().openpi_policy
    opaque._is_pytorch_model = True  # not split into parts: Policy.infer is called whole
    wrapped = pi0_mod.OpenpiPi0Policy(opaque, extra={})
    assert wrapped.metadata.extra["timing_split"] is False
    o = obs(4)
    np.testing.assert_array_equal(wrapped.infer(o)["action"], policy.infer(o)["action"])


def test_invalid_input_is_rejected(fake):
    policy = exact()
    bad = obs()
    bad["state"] = bad["state"].astype(np.float64)
    with pytest.raises(InvalidInputError):
        policy.infer(bad)
    with pytest.raises(InvalidInputError):
        policy.infer({"state": obs()["state"]})


# --- timing --------------------------------------------------------------------------------------------------


def test_inference_ms_waits_for_the_result(fake):
    _, policy_mod = fake
    policy_mod.DEVICE_DELAY_S = 0.05  # the result is ready 50 ms after sample_actions returns
    policy = exact()
    reply = policy.infer(obs())
    timing = reply["policy_timing"]
    assert set(timing) == {"preprocess_ms", "device_ms", "postprocess_ms"}
    assert reply["inference_ms"] == timing["device_ms"] >= 50.0
    assert timing["preprocess_ms"] >= 0 and timing["postprocess_ms"] >= 0
    # openpi's own figure stops at dispatch and misses those 50 ms
    own = exact().openpi_policy.infer(pi0_mod.OpenpiPi0Policy.to_openpi(obs()))
    assert own["policy_timing"]["infer_ms"] < 25.0


def test_batch_inference_ms_waits_for_the_result(fake):
    _, policy_mod = fake
    policy_mod.DEVICE_DELAY_S = 0.05
    policy = exact()
    for reply in policy.infer_batch([obs(0), obs(1)]):
        assert reply["inference_ms"] >= 50.0


def test_warmup_records_compile_and_draws_no_noise(fake):
    policy = exact()
    policy.warmup()
    assert isinstance(policy.metadata.extra["compile_s"], float)
    assert policy.metadata.extra["warmup_s"] >= 0
    fresh = exact()
    o = obs(5)
    np.testing.assert_array_equal(policy.infer(o)["action"], fresh.infer(o)["action"])


# --- batches -------------------------------------------------------------------------------------------------


def test_infer_batch_is_one_model_call_matching_sequential_calls(fake):
    batched = exact()
    sequential = exact()
    batch = [obs(i, prompt=f"task {i}") for i in range(3)]
    model = batched.openpi_policy._model
    replies = batched.infer_batch(batch)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 4  # padded to a power of two
    assert len(replies) == 3
    for o, reply in zip(batch, replies, strict=True):
        assert reply["action"].shape == (50, 14) and reply["action"].dtype == np.float32
        np.testing.assert_allclose(reply["action"], sequential.infer(o)["action"], rtol=1e-3, atol=1e-3)
        assert set(reply["policy_timing"]) == {"preprocess_ms", "device_ms", "postprocess_ms"}


def test_infer_batch_edge_sizes(fake):
    policy = exact()
    assert policy.infer_batch([]) == []
    one = policy.infer_batch([obs()])
    assert len(one) == 1 and one[0]["action"].shape == (50, 14)


def test_reset_is_harmless(fake):
    policy = exact()
    policy.reset()
    assert policy.infer(obs())["action"].shape == (50, 14)


def test_bucket_sizes():
    assert [pi0_mod._bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_max_batch_warms_every_padded_size_without_drawing_noise(fake):
    policy = exact(max_batch=5)
    assert policy.warmup_batch_sizes == (1, 2, 4, 8)
    policy.warmup()
    assert {c["batch"] for c in policy.openpi_policy._model.calls} == {1, 2, 4, 8}
    fresh = exact()
    np.testing.assert_array_equal(policy.infer(obs(6))["action"], fresh.infer(obs(6))["action"])


def test_fast_host_path_gives_openpis_values(fake):
    policy = exact()
    assert policy.fast_host and policy.metadata.extra["fast_host"] is True
    plain = pi0_mod.OpenpiPi0Policy(exact().openpi_policy, extra={}, fast_host=False)
    for seed in range(2):
        o = obs(seed, prompt="Transfer cube")
        np.testing.assert_array_equal(policy.infer(o)["action"], plain.infer(o)["action"])


# --- the fast path (default): one jitted function, checked against the stand-in's Policy.infer ----------------


def _needs_jax():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("the fast path compiles with jax")


def _noise(seed: int, n: int = 1):
    return np.random.default_rng(100 + seed).standard_normal((n, 50, 32)).astype(np.float32)


def _reference(o, noise):
    """openpi's Policy.infer on a fresh stand-in policy, with the given noise."""
    ref = exact().openpi_policy
    return ref.infer(pi0_mod.OpenpiPi0Policy.to_openpi(o), noise=noise)["actions"]


def _close(got, want):
    # float32 arithmetic reordered by XLA (~1e-5 of the chunk's scale); a wrong slot, transform or unit is off
    # by orders of magnitude more
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * max(1.0, float(np.max(np.abs(want)))))


CAMERA_CASES = {
    "one camera": ({}, ("base_0_rgb",)),
    "left wrist": ({"cam_left_wrist": 2}, ("base_0_rgb", "left_wrist_0_rgb")),
    "right wrist": ({"cam_right_wrist": 3}, ("base_0_rgb", "right_wrist_0_rgb")),
    "low camera (openpi ignores it)": ({"cam_low": 4}, ("base_0_rgb",)),
    "all cameras": (
        {"cam_low": 4, "cam_left_wrist": 2, "cam_right_wrist": 3},
        ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"),
    ),
}


@pytest.mark.parametrize("case", list(CAMERA_CASES))
def test_fast_path_matches_openpi_and_drops_only_masked_slots(fake, case):
    _needs_jax()
    cams, slots = CAMERA_CASES[case]
    policy = pi0_mod.make_pi0_policy()
    o = obs(7, prompt="Transfer cube", **{c: obs(s)["cam_high"] for c, s in cams.items()})
    noise = _noise(0)
    reply = policy.infer(o, noise=noise[0])
    assert policy.last_call["slots"] == slots  # only the slots openpi's masks say present
    assert reply["action"].dtype == np.float32 and reply["action"].shape == (50, 14)
    _close(reply["action"], _reference(o, noise))


def test_fast_path_units_transforms_and_prompt(fake):
    """Normalization, ALOHA's joint/gripper conversion and the prompt all reach the actions as openpi's do."""
    _needs_jax()
    policy = pi0_mod.make_pi0_policy(config="pi0_aloha_quantiles")
    noise = _noise(1)
    base = obs(3)
    for o in (base, {**base, "prompt": "pick up the cube"}, {**base, "state": np.full(14, 0.04, np.float32)}):
        ref = exact(config="pi0_aloha_quantiles").openpi_policy.infer(
            pi0_mod.OpenpiPi0Policy.to_openpi(o), noise=noise
        )["actions"]
        _close(policy.infer(o, noise=noise[0])["action"], ref)
    # the stand-in's transforms are not the identity: a wrong unit would show
    raw = np.asarray(
        policy.openpi_policy._model.sample_actions(None, _dummy_observation(policy, base), noise=noise)
    )
    assert np.max(np.abs(raw[0, :, :14] - policy.infer(base, noise=noise[0])["action"])) > 0.1


def _dummy_observation(policy, o):
    model_mod = importlib.import_module("openpi.models.model")
    data = policy.openpi_policy._input_transform(pi0_mod.OpenpiPi0Policy.to_openpi(o))
    return model_mod.Observation.from_dict(
        {
            k: np.asarray(v)[None]
            if not isinstance(v, dict)
            else {kk: np.asarray(vv)[None] for kk, vv in v.items()}
            for k, v in data.items()
        }
    )


def test_fast_path_draws_openpis_noise_stream(fake):
    _needs_jax()
    fast = pi0_mod.make_pi0_policy()
    ref = exact().openpi_policy  # same rng (key 0) as the fast policy's
    for seed in range(2):
        o = obs(seed, prompt="Transfer cube")
        _close(fast.infer(o)["action"], ref.infer(pi0_mod.OpenpiPi0Policy.to_openpi(o))["actions"])


def test_fast_path_tokenizes_each_prompt_once(fake):
    _needs_jax()
    tokenizer = importlib.import_module("openpi.models.tokenizer")
    policy = pi0_mod.make_pi0_policy()
    tokenizer.CALLS.clear()
    for seed in range(3):
        policy.infer(obs(seed, prompt="stack the cubes"))
    policy.infer(obs(0))  # the config's default prompt
    assert tokenizer.CALLS == ["stack the cubes", "Transfer cube"]


def test_fast_batch_is_one_call_and_matches_openpi_per_item(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy()
    batch = [obs(i, prompt=f"task {i}") for i in range(3)]
    batch.append(obs(9, cam_left_wrist=obs(10)["cam_high"]))  # another camera set: its own call
    noise = _noise(2, 4)
    replies = policy.infer_batch(batch, noise=noise)
    assert len(replies) == 4
    for o, n, reply in zip(batch, noise, replies, strict=True):
        _close(reply["action"], _reference(o, n[None]))
        assert set(reply["policy_timing"]) == {"preprocess_ms", "device_ms", "postprocess_ms"}
    shapes = {k[0] for k in policy._compiled}
    assert shapes == {4, 1}  # three same-camera robots padded to 4, the two-camera one alone


def test_fast_warmup_compiles_padded_sizes_and_draws_no_noise(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy(max_batch=2)
    policy.warmup()
    assert {(k[0], k[4]) for k in policy._compiled} == {(1, False), (1, True), (2, False), (2, True)}
    assert policy.metadata.extra["compile_s"] >= 0 and policy.metadata.extra["path"] == "fast"
    fresh = pi0_mod.make_pi0_policy()
    np.testing.assert_array_equal(policy.infer(obs(5))["action"], fresh.infer(obs(5))["action"])


def test_fast_path_resizes_other_camera_sizes_on_the_device(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy()
    wrist = np.random.default_rng(4).integers(0, 256, (3, 120, 160), dtype=np.uint8)
    o = obs(2, cam_right_wrist=wrist)
    noise = _noise(3)
    got = policy.infer(o, noise=noise[0])["action"]
    want = _reference(o, noise)
    # JAX's bilinear vs PIL's: pixel rounding only (the same pixels at 224x224 agree to float rounding)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.max(np.abs(want)))


def test_fast_path_rejects_bad_cameras(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy()
    with pytest.raises(InvalidInputError, match="cam_left_wrist"):
        policy.infer(obs(cam_left_wrist=np.zeros((224, 224, 3), np.uint8)))
    with pytest.raises(InvalidInputError):
        policy.infer({**obs(), "cam_high": obs()["cam_high"].astype(np.float32)})
    assert policy.infer(obs())["action"].shape == (50, 14)  # still serving


def test_transforms_that_change_pixels_fall_back_to_exact(fake, monkeypatch):
    _needs_jax()
    policy_config, _ = fake
    original = policy_config.create_trained_policy

    def with_pixel_transform(*args, **kwargs):
        p = original(*args, **kwargs)

        def invert(data):
            data["image"] = {k: 255 - v for k, v in data["image"].items()}
            return data

        p._input_transform.transforms.insert(3, invert)
        return p

    monkeypatch.setattr(policy_config, "create_trained_policy", with_pixel_transform)
    policy = pi0_mod.make_pi0_policy()
    assert isinstance(policy, pi0_mod.OpenpiPi0Policy) and policy.metadata.extra["path"] == "exact"


# --- real-time chunking on the fast path, and the output transform on the device -----------------------------


def _rtc_case(policy, seed: int = 0, n: int = 25, d: int = 5):
    """A prefix as a robot would send it: the unexecuted rest of the chunk for an earlier observation."""
    previous = policy.infer(obs(50 + seed), noise=_noise(50 + seed)[0])["action"]
    return obs(seed), {"prefix": previous[-n:].copy(), "delay_steps": d}


def test_rtc_pulls_the_first_actions_onto_the_prefix(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy(rtc_beta=5.0)
    meta = policy.metadata.to_dict()
    assert meta["rtc"] is True and meta["rtc_beta"] == 5.0 and meta["rtc_schedule"] == "exp"
    o, field = _rtc_case(policy)
    noise = _noise(4)[0]
    free = policy.infer(o, noise=noise)["action"]
    guided = policy.infer({**o, "rtc": field}, noise=noise)
    assert policy.last_call["guided"] is True
    d = field["delay_steps"]
    unguided_error = float(np.max(np.abs(free[:d] - field["prefix"][:d])))
    assert guided["rtc"]["delay_steps"] == d and guided["rtc"]["beta"] == 5.0
    assert guided["rtc"]["prefix_error"] == pytest.approx(
        float(np.max(np.abs(guided["action"][:d] - field["prefix"][:d]))), rel=1e-6
    )
    assert guided["rtc"]["prefix_error"] < 0.25 * unguided_error
    # past the prefix the chunk is free again: guidance changes the start, not the whole chunk's scale
    assert np.max(np.abs(guided["action"][-10:] - free[-10:])) < 3 * np.max(np.abs(free))


def test_rtc_batch_mixes_guided_and_unguided_in_one_call(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy()
    o, field = _rtc_case(policy, seed=1)
    plain = obs(2)
    noise = _noise(5, 2)
    replies = policy.infer_batch([{**o, "rtc": field}, plain], noise=noise)
    assert policy.last_call == {"batch": 2, "slots": ("base_0_rgb",), "guided": True}
    assert "rtc" in replies[0] and "rtc" not in replies[1]
    _close(replies[1]["action"], _reference(plain, noise[1:]))  # W = 0: sampled as without guidance


def test_rtc_prefix_enters_model_space_through_openpis_training_transforms(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy()
    prefix = np.random.default_rng(3).uniform(-1, 1, (10, 14)).astype(np.float32)
    item = policy.plan.inputs(
        obs(), None, pi0_mod.parse_rtc({"rtc": {"prefix": prefix, "delay_steps": 2}}, 50, 14)
    )
    want = policy.openpi_policy._input_transform(
        {**pi0_mod.OpenpiPi0Policy.to_openpi(obs()), "actions": prefix}
    )["actions"]
    np.testing.assert_allclose(item.prefix, want, rtol=1e-6, atol=1e-6)
    assert item.prefix.shape == (10, 32) and not item.prefix[:, 14:].any()


def test_paths_without_rtc_refuse_it(fake):
    policy = exact()
    with pytest.raises(InvalidInputError, match="real-time chunking"):
        policy.infer({**obs(), "rtc": {"prefix": np.zeros((5, 14), np.float32), "delay_steps": 1}})
    assert "rtc" not in policy.metadata.to_dict()


def test_bad_rtc_is_a_typed_error(fake):
    _needs_jax()
    policy = pi0_mod.make_pi0_policy()
    for field in (
        {"prefix": np.zeros((5, 13), np.float32), "delay_steps": 1},
        {"prefix": np.zeros((5, 14), np.float32), "delay_steps": 6},
        {"prefix": np.zeros((51, 14), np.float32), "delay_steps": 1},
    ):
        with pytest.raises(InvalidInputError):
            policy.infer({**obs(), "rtc": field})


def test_output_transform_runs_on_the_device_when_affine_else_on_the_host(fake, monkeypatch):
    _needs_jax()
    policy_config, _ = fake
    policy = pi0_mod.make_pi0_policy()
    assert policy.metadata.extra["output_transform"] == "device"
    original = policy_config.create_trained_policy

    def with_clip(*args, **kwargs):
        p = original(*args, **kwargs)
        p._output_transform.transforms.append(lambda data: {"actions": np.clip(data["actions"], -1.0, 1.0)})
        return p

    monkeypatch.setattr(policy_config, "create_trained_policy", with_clip)
    clipped = pi0_mod.make_pi0_policy()
    assert clipped.metadata.extra["output_transform"] == "host"
    o, noise = obs(8), _noise(8)
    ref = exact().openpi_policy.infer(pi0_mod.OpenpiPi0Policy.to_openpi(o), noise=noise)["actions"]
    _close(clipped.infer(o, noise=noise[0])["action"], ref)


def test_orbax_metadata_fallback_only_for_that_error(monkeypatch):
    from pi0remote.policies import pi0_checkpoint

    calls = []

    def openpi_restore(path, **kwargs):
        calls.append(("openpi", path))
        if path == "new-orbax":
            raise TypeError("'StepMetadata' object is not subscriptable")
        if path == "broken":
            raise TypeError("something else")
        return {"params": "openpi's"}

    monkeypatch.setattr(
        pi0_checkpoint, "restore_params_compat", lambda path, **kw: {"params": "compat", **kw}
    )
    mod = type(sys)("fake_model_module")
    mod.restore_params = openpi_restore
    with pi0_checkpoint._orbax_compat(mod) as used:
        assert mod.restore_params("old-orbax", dtype="bf16") == {"params": "openpi's"} and not used
        assert mod.restore_params("new-orbax", dtype="bf16") == {"params": "compat", "dtype": "bf16"} and used
        with pytest.raises(TypeError, match="something else"):
            mod.restore_params("broken")
    assert mod.restore_params is openpi_restore  # put back after loading
