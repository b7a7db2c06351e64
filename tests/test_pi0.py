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
import sys
from pathlib import Path

import numpy as np
import pytest

from pi0remote.errors import InvalidInputError
from pi0remote.policies import load_policy
from pi0remote.policies import pi0 as pi0_mod

FAKE = Path(__file__).parent / "fake_openpi"
STUBBED = ("openpi", "jax")


def _is_stubbed(name: str) -> bool:
    return name.split(".")[0] in STUBBED


@pytest.fixture
def fake(monkeypatch):
    """Put the stand-in openpi (and, where jax is absent, the numpy jax stand-in) first on sys.path."""
    need_jax = importlib.util.find_spec("jax") is None
    for name in list(sys.modules):
        if name.split(".")[0] == "openpi":
            monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(FAKE))
    if need_jax:
        monkeypatch.syspath_prepend(str(FAKE / "_nojax"))
    policy_config = importlib.import_module("openpi.policies.policy_config")
    policy_mod = importlib.import_module("openpi.policies.policy")
    policy_config.CREATED.clear()
    policy_config.SEEN_INPUTS.clear()
    policy_mod.DEVICE_DELAY_S = 0.0
    yield policy_config, policy_mod
    for name in set(sys.modules) - before:
        if _is_stubbed(name):
            del sys.modules[name]


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
    assert isinstance(policy, pi0_mod.OpenpiPi0Policy)


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
    assert isinstance(policy, pi0_mod.OpenpiPi0Policy)


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


def test_pytorch_port_is_stubbed_only_when_it_cannot_import(fake):
    pi0_mod.make_pi0_policy()
    stub = sys.modules["openpi.models_pytorch.pi0_pytorch"]
    with pytest.raises(ImportError, match="only JAX checkpoints"):
        stub.PI0Pytorch  # noqa: B018


# --- the request mapping and the actions ---------------------------------------------------------------------


def test_request_maps_to_openpis_aloha_input(fake):
    policy_config, _ = fake
    policy = pi0_mod.make_pi0_policy()
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
    policy = pi0_mod.make_pi0_policy()
    policy.infer(obs())
    assert "prompt" not in policy_config.SEEN_INPUTS[-1]  # openpi injects the config's default prompt


def test_actions_are_exactly_openpis(fake):
    policy = pi0_mod.make_pi0_policy()
    reference = pi0_mod.make_pi0_policy().openpi_policy  # a fresh openpi Policy, same rng
    for seed in range(3):
        o = obs(seed, prompt="Transfer cube")
        reply = policy.infer(o)
        expected = reference.infer(pi0_mod.OpenpiPi0Policy.to_openpi(o))["actions"]
        assert reply["action"].dtype == np.float32 and reply["action"].shape == (50, 14)
        np.testing.assert_array_equal(reply["action"], expected.astype(np.float32))


def test_openpi_infer_fallback_gives_the_same_actions(fake):
    policy_config, _ = fake
    policy = pi0_mod.make_pi0_policy()
    opaque = pi0_mod.make_pi0_policy().openpi_policy
    opaque._is_pytorch_model = True  # not split into parts: Policy.infer is called whole
    wrapped = pi0_mod.OpenpiPi0Policy(opaque, extra={})
    assert wrapped.metadata.extra["timing_split"] is False
    o = obs(4)
    np.testing.assert_array_equal(wrapped.infer(o)["action"], policy.infer(o)["action"])


def test_invalid_input_is_rejected(fake):
    policy = pi0_mod.make_pi0_policy()
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
    policy = pi0_mod.make_pi0_policy()
    reply = policy.infer(obs())
    timing = reply["policy_timing"]
    assert set(timing) == {"preprocess_ms", "device_ms", "postprocess_ms"}
    assert reply["inference_ms"] == timing["device_ms"] >= 50.0
    assert timing["preprocess_ms"] >= 0 and timing["postprocess_ms"] >= 0
    # openpi's own figure stops at dispatch and misses those 50 ms
    own = pi0_mod.make_pi0_policy().openpi_policy.infer(pi0_mod.OpenpiPi0Policy.to_openpi(obs()))
    assert own["policy_timing"]["infer_ms"] < 25.0


def test_batch_inference_ms_waits_for_the_result(fake):
    _, policy_mod = fake
    policy_mod.DEVICE_DELAY_S = 0.05
    policy = pi0_mod.make_pi0_policy()
    for reply in policy.infer_batch([obs(0), obs(1)]):
        assert reply["inference_ms"] >= 50.0


def test_warmup_records_compile_and_draws_no_noise(fake):
    policy = pi0_mod.make_pi0_policy()
    policy.warmup()
    assert isinstance(policy.metadata.extra["compile_s"], float)
    assert policy.metadata.extra["warmup_s"] >= 0
    fresh = pi0_mod.make_pi0_policy()
    o = obs(5)
    np.testing.assert_array_equal(policy.infer(o)["action"], fresh.infer(o)["action"])


# --- batches -------------------------------------------------------------------------------------------------


def test_infer_batch_is_one_model_call_matching_sequential_calls(fake):
    batched = pi0_mod.make_pi0_policy()
    sequential = pi0_mod.make_pi0_policy()
    batch = [obs(i, prompt=f"task {i}") for i in range(3)]
    model = batched.openpi_policy._model
    replies = batched.infer_batch(batch)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 4  # padded to a power of two
    assert len(replies) == 3
    for o, reply in zip(batch, replies, strict=True):
        assert reply["action"].shape == (50, 14) and reply["action"].dtype == np.float32
        np.testing.assert_allclose(reply["action"], sequential.infer(o)["action"], rtol=0, atol=1e-6)
        assert set(reply["policy_timing"]) == {"preprocess_ms", "device_ms", "postprocess_ms"}


def test_infer_batch_edge_sizes(fake):
    policy = pi0_mod.make_pi0_policy()
    assert policy.infer_batch([]) == []
    one = policy.infer_batch([obs()])
    assert len(one) == 1 and one[0]["action"].shape == (50, 14)


def test_reset_is_harmless(fake):
    policy = pi0_mod.make_pi0_policy()
    policy.reset()
    assert policy.infer(obs())["action"].shape == (50, 14)


def test_bucket_sizes():
    assert [pi0_mod._bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_max_batch_warms_every_padded_size_without_drawing_noise(fake):
    policy = pi0_mod.make_pi0_policy(max_batch=5)
    assert policy.warmup_batch_sizes == (1, 2, 4, 8)
    policy.warmup()
    assert {c["batch"] for c in policy.openpi_policy._model.calls} == {1, 2, 4, 8}
    fresh = pi0_mod.make_pi0_policy()
    np.testing.assert_array_equal(policy.infer(obs(6))["action"], fresh.infer(obs(6))["action"])


def test_fast_host_path_gives_openpis_values(fake):
    policy = pi0_mod.make_pi0_policy()
    assert policy.fast_host and policy.metadata.extra["fast_host"] is True
    plain = pi0_mod.OpenpiPi0Policy(pi0_mod.make_pi0_policy().openpi_policy, extra={}, fast_host=False)
    for seed in range(2):
        o = obs(seed, prompt="Transfer cube")
        np.testing.assert_array_equal(policy.infer(o)["action"], plain.infer(o)["action"])
