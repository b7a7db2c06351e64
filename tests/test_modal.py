"""The Modal deployment without a Modal account.

* The app module is imported and its definition read back through Modal's own objects (the class, its
  lifecycle methods and web endpoint, GPU, autoscaling, memory snapshot, concurrency, volume, secrets,
  the image's build steps).
* The container's start-up code (``pi0remote.deploy``) runs here, outside Modal: a real PolicyServer on
  loopback, a dict as the endpoint store, and a ``forward`` that hands back the local address (Modal's tunnel
  cannot exist here; everything else is real sockets and the real clients).
* The ASGI front runs under uvicorn on loopback and is driven by the real HTTP and WebSocket clients.
* ``modal://`` URLs resolve against a store the test controls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from conftest import HAVE_QUIC, ProbePolicy, expected_action, make_obs

modal = pytest.importorskip("modal")

from modal._utils.async_utils import synchronizer  # noqa: E402

import pi0remote  # noqa: E402
from pi0remote import (  # noqa: E402
    AuthenticationError,
    ConnectError,
    connect,
    deploy,  # noqa: E402
)
from pi0remote.client import modal as modal_client  # noqa: E402
from pi0remote.server import PolicyServer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TOKEN = "test-token-5f1c"
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


# --------------------------------------------------------------------------------------------------------------
# helpers


class FakeTunnel:
    """What ``modal.forward(port, unencrypted=True)`` yields, pointing at the local port itself."""

    def __init__(self, port: int) -> None:
        self.tcp_socket = ("127.0.0.1", port)


class LocalForward:
    """A ``forward`` callable: records which ports were forwarded and whether each portal was closed."""

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.closed: list[int] = []

    def __call__(self, port: int):
        @contextlib.contextmanager
        def cm():
            self.opened.append(port)
            try:
                yield FakeTunnel(port)
            finally:
                self.closed.append(port)

        return cm()


class RecordingStore(dict):
    """A dict that remembers its writes (the endpoint store stands in for a ``modal.Dict``)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[float, str, dict[str, Any]]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes.append((time.monotonic(), key, dict(value)))
        super().__setitem__(key, value)


class WarmupProbe(ProbePolicy):
    def __init__(self) -> None:
        super().__init__()
        self.warmed_at: float | None = None

    def warmup(self) -> None:
        time.sleep(0.05)
        self.warmed_at = time.monotonic()


class _Settings(dict):
    def __missing__(self, key: str) -> Any:  # pragma: no cover - Modal internals moved
        pytest.skip(f"this modal version's definition has no {key!r} to read back")


def _closure(obj: Any) -> dict[str, Any]:
    """The settings a Modal object was defined with (its loader's closure)."""
    impl = synchronizer._translate_in(obj)
    try:
        return _Settings(inspect.getclosurevars(impl._load).nonlocals)
    except (AttributeError, TypeError) as exc:  # pragma: no cover - Modal internals moved
        pytest.skip(f"cannot introspect this modal version's objects: {exc}")


def _image_commands(image: Any, version: str = "2025.06") -> list[str]:
    """Every Dockerfile command of an image and its bases, in build order."""
    nl = _closure(image)
    out: list[str] = []
    bases = list((nl.get("base_images") or {}).values())
    if nl.get("base_image") is not None:
        bases.append(nl["base_image"])
    for base in bases:
        out += _image_commands(base, version)
    fn = nl.get("dockerfile_function")
    if fn is not None:
        out += list(fn(version).commands)
    return out


def _run_python(code: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PI0REMOTE_", "MODAL_"))}
    full["PYTHONPATH"] = SRC + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout
    )


def _no_modal_env(tmp_path) -> dict[str, str]:
    """No credentials and no reachable Modal server: anything that contacts Modal fails."""
    return {
        "HOME": str(tmp_path),
        "MODAL_CONFIG_PATH": str(tmp_path / "absent.toml"),
        "MODAL_SERVER_URL": "http://127.0.0.1:9",
    }


@pytest.fixture(scope="module")
def modal_app():
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PI0REMOTE_")}
    try:
        import pi0remote.modal_app as m

        yield m
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------------------------
# the app definition


def test_importing_the_app_needs_no_modal_account(tmp_path) -> None:
    code = (
        "import pi0remote.modal_app as m\n"
        "print(m.app.name, type(m.Pi0Server).__name__, type(m.fetch_checkpoint).__name__)\n"
    )
    proc = _run_python(code, _no_modal_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["pi0remote", "Cls", "Function"]


def test_gpu_class_definition(modal_app) -> None:
    m = modal_app
    assert isinstance(m.app, modal.App) and m.app.name == "pi0remote"
    assert isinstance(m.Pi0Server, modal.Cls)
    c = _closure(synchronizer._translate_in(m.Pi0Server)._class_service_function)
    assert c["gpu"] == "H100"
    assert c["min_containers"] == 1
    assert c["scaledown_window"] == 300
    assert c["enable_memory_snapshot"] is True
    assert c["max_concurrent_inputs"] == m.CONFIG.max_inputs > 1  # @modal.concurrent
    assert c["timeout"] >= 3600  # one WebSocket session is one input
    assert c["scheduler_placement"] is None  # no region pinned by default
    # the checkpoint Volume and the token Secret
    volumes = dict(c["validated_volumes_no_cloud_buckets"])
    assert set(volumes) == {"/cache"}
    assert "pi0remote-cache" in repr(volumes["/cache"])
    secrets = [repr(s) for s in c["secrets"]]
    assert any("Secret.from_name('pi0remote-token')" in s for s in secrets), secrets
    # the ASGI web endpoint on the class
    methods = c["method_definitions"]
    assert set(methods) == {"web"}
    from modal_proto import api_pb2

    assert methods["web"].webhook_config.type == api_pb2.WEBHOOK_TYPE_ASGI_APP
    assert methods["web"].webhook_config.requires_proxy_auth is False


def test_lifecycle_methods(modal_app) -> None:
    from modal._partial_function import _find_partial_methods_for_user_cls, _PartialFunctionFlags

    user_cls = synchronizer._translate_in(modal_app.Pi0Server)._user_cls
    pre = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)
    post = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)
    exits = _find_partial_methods_for_user_cls(user_cls, _PartialFunctionFlags.EXIT)
    assert set(pre) == {"preload"} and set(post) == {"start"} and set(exits) == {"stop"}
    # the pre-snapshot step imports modules and nothing else: it runs here too
    obj = user_cls.__new__(user_cls)
    pre["preload"].raw_f(obj)
    assert "pi0remote.server" in obj.preloaded
    assert "jax" not in sys.modules or "jax" in obj.preloaded


def test_setup_function_fetches_into_the_volume(modal_app) -> None:
    c = _closure(modal_app.fetch_checkpoint)
    assert c["gpu"] is None
    volumes = dict(c["validated_volumes_no_cloud_buckets"])
    assert "pi0remote-cache" in repr(volumes["/cache"])
    assert c["timeout"] >= 1800
    assert "gsutil" in " ".join(_image_commands(modal_app.fetch_image))


def test_image_installs_pinned_openpi_and_local_source(modal_app) -> None:
    commands = _image_commands(modal_app.image)
    text = "\n".join(commands)
    commit = modal_app.OPENPI_GIT_COMMIT
    assert len(commit) == 40
    from pi0remote.policies import pi0 as pi0_backend

    assert commit == getattr(pi0_backend, "OPENPI_COMMIT", commit)
    assert "git clone" in text and "github.com/Physical-Intelligence/openpi" in text
    assert f"checkout {commit}" in text
    assert "uv sync --frozen" in text and "GIT_LFS_SKIP_SMUDGE=1" in text
    assert "aioquic" in text and "msgpack" in text and "websockets" in text
    assert "OPENPI_DATA_HOME=/cache/openpi" in text
    assert "pi0remote" in synchronizer._translate_in(modal_app.image)._added_python_source_set
    # ... and only there: no second, implicit mount of the package
    svc = synchronizer._translate_in(modal_app.Pi0Server)._class_service_function
    assert not any("pi0remote" in repr(mount) for mount in svc._spec.mounts)
    # the clone comes before the checkout, which comes before the install
    order = [i for i, c in enumerate(commands) if "git clone" in c or "checkout" in c or "uv sync" in c]
    assert order == sorted(order) and len(order) == 3


def test_environment_overrides(tmp_path) -> None:
    code = (
        "import json, inspect\n"
        "import pi0remote.modal_app as m\n"
        "from modal._utils.async_utils import synchronizer\n"
        "svc = synchronizer._translate_in(m.Pi0Server)._class_service_function\n"
        "c = inspect.getclosurevars(svc._load).nonlocals\n"
        "print(json.dumps({'app': m.app.name, 'gpu': c['gpu'], 'regions': list(c['scheduler_placement'].regions),\n"
        "  'min': c['min_containers'], 'routing': c['routing_region'], 'proxy': c['method_definitions']['web'].webhook_config.requires_proxy_auth,\n"
        "  'secrets': [repr(s) for s in c['secrets']], 'snap': c['enable_memory_snapshot'],\n"
        "  'env': m.CONFIG.container_env(), 'store': m.CONFIG.endpoints_name}))\n"
    )
    env = dict(
        _no_modal_env(tmp_path),
        PI0REMOTE_APP="robot-policy",
        PI0REMOTE_GPU="A100-80GB",
        PI0REMOTE_REGION="eu-west",
        PI0REMOTE_ROUTING_REGION="eu-west",
        PI0REMOTE_MIN_CONTAINERS="2",
        PI0REMOTE_SECRET="robot-token",
        PI0REMOTE_PROXY_AUTH="1",
        PI0REMOTE_MEMORY_SNAPSHOT="0",
        PI0REMOTE_TOKEN="must-not-leak",
    )
    proc = _run_python(code, env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["app"] == "robot-policy" and out["store"] == "robot-policy-endpoints"
    assert out["gpu"] == "A100-80GB" and out["regions"] == ["eu-west"] and out["min"] == 2
    assert out["routing"] == "eu-west"
    assert out["proxy"] is True and out["snap"] is False
    assert any("robot-token" in s for s in out["secrets"])
    # the containers see the deployer's settings, never the token
    assert out["env"]["PI0REMOTE_APP"] == "robot-policy" and "PI0REMOTE_TOKEN" not in out["env"]


def test_config_from_env() -> None:
    cfg = deploy.DeployConfig.from_env({})
    assert (cfg.app_name, cfg.gpu, cfg.region, cfg.min_containers) == ("pi0remote", "H100", None, 1)
    assert cfg.portals == ("tcp", "quic+tcp") and cfg.endpoints_name == "pi0remote-endpoints"
    assert cfg.checkpoint_url == "gs://openpi-assets/checkpoints/pi0_aloha_sim"
    cfg = deploy.DeployConfig.from_env(
        {
            "PI0REMOTE_GPU": "none",
            "PI0REMOTE_REGION": "us-east, us-west",
            "PI0REMOTE_PORTALS": "tcp",
            "PI0REMOTE_TCP_PORT": "0",
            "PI0REMOTE_POLICY": "zeros",
        }
    )
    assert cfg.gpu is None and cfg.region == ["us-east", "us-west"] and cfg.portals == ("tcp",)
    assert cfg.tcp_port == 0 and cfg.policy_options() == {}
    with pytest.raises(ValueError, match="PORTALS"):
        deploy.DeployConfig.from_env({"PI0REMOTE_PORTALS": "quic"})


def test_checkpoint_is_read_from_the_cache_never_downloaded(tmp_path) -> None:
    cfg = deploy.DeployConfig.from_env({"PI0REMOTE_CACHE_DIR": str(tmp_path)})
    local = deploy.cached_checkpoint(cfg.checkpoint_url, cfg.openpi_data_home)
    assert local == str(tmp_path / "openpi" / "openpi-assets" / "checkpoints" / "pi0_aloha_sim")
    with pytest.raises(FileNotFoundError, match="fetch_checkpoint"):
        deploy.load_configured_policy(cfg)
    # a setup function that fails to fill the cache is called once, then the start fails clearly
    calls = []
    with pytest.raises(FileNotFoundError, match="not cached"):
        deploy.ensure_checkpoint(cfg, fetch=lambda: calls.append(1))
    assert calls == [1]
    # the first container runs the setup function when the cache is empty, later ones only read the cache
    assert deploy.ensure_checkpoint(cfg, fetch=lambda: os.makedirs(local)) == local
    assert deploy.ensure_checkpoint(cfg, fetch=lambda: pytest.fail("fetched again")) == local


# --------------------------------------------------------------------------------------------------------------
# container start-up, outside Modal


def test_startup_serves_warms_forwards_publishes_and_unpublishes() -> None:
    policy = WarmupProbe()
    store = RecordingStore()
    forward = LocalForward()
    container = deploy.start_container(
        policy,
        store=store,
        forward=forward,
        token=TOKEN,
        container_id="ta-local-1",
        host="127.0.0.1",
        tcp_port=0,
        quic_port=0,
        heartbeat_s=0.1,
    )
    try:
        assert isinstance(container.server, PolicyServer)
        assert container.core.ready and container.core.token == TOKEN
        tcp_port = int(container.server.url("tcp").rsplit(":", 1)[1])
        assert forward.opened[0] == tcp_port
        entry = store["ta-local-1"]
        assert entry["portals"]["tcp"] == f"127.0.0.1:{tcp_port}"
        assert entry["container_id"] == "ta-local-1" and entry["version"] == pi0remote.__version__
        # warm-up finished before anything was published
        assert policy.warmed_at is not None and store.writes[0][0] >= policy.warmed_at
        # the heartbeat keeps the entry fresh
        first = entry["heartbeat"]
        deadline = time.monotonic() + 5
        while store["ta-local-1"]["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store["ta-local-1"]["heartbeat"] > first
        assert store["ta-local-1"]["started_at"] == entry["started_at"]
        # the published portal serves the policy, with the token
        obs = make_obs(3)
        with connect("modal://pi0remote/tcp", modal_store=store, token=TOKEN) as client:
            reply = client.infer(obs)
            assert client.metadata["deployment"]["container_id"] == "ta-local-1"
        np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
        with pytest.raises(AuthenticationError):
            connect("modal://pi0remote/tcp", modal_store=store, token=None)
        with pytest.raises(AuthenticationError):
            connect("modal://pi0remote/tcp", modal_store=store, token="wrong")
    finally:
        container.close()
    assert "ta-local-1" not in store
    assert sorted(forward.closed) == sorted(forward.opened)
    writes = len(store.writes)
    time.sleep(0.3)
    assert len(store.writes) == writes  # no heartbeat after shutdown
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", tcp_port), timeout=2):
        pass
    with pytest.raises(ConnectError, match="no live tcp portal"):
        modal_client.resolve_modal_url("modal://pi0remote/tcp", modal_store=store)


@pytest.mark.skipif(not HAVE_QUIC, reason="needs aioquic and pi0remote.server.quic")
def test_startup_publishes_quic_portal_with_fingerprint() -> None:
    store: dict[str, Any] = {}
    forward = LocalForward()
    with deploy.start_container(
        ProbePolicy(),
        store=store,
        forward=forward,
        token=TOKEN,
        container_id="ta-quic",
        host="127.0.0.1",
        tcp_port=0,
        quic_port=0,
        heartbeat_s=0,
    ) as container:
        entry = store["ta-quic"]
        assert set(entry["portals"]) == {"tcp", "quic+tcp"}
        assert entry["quic_fingerprint"] == container.core.metadata()["quic_fingerprint"]
        obs = make_obs(4)
        with connect("modal://pi0remote/quic+tcp", modal_store=store, token=TOKEN) as client:
            reply = client.infer(obs)
        np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
    assert store == {}


def test_startup_from_config_matches_serve() -> None:
    """The container builds the configured policy and the same PolicyServer ``python -m pi0remote.serve`` would."""
    cfg = deploy.DeployConfig.from_env(
        {
            "PI0REMOTE_POLICY": "zeros",
            "PI0REMOTE_TCP_PORT": "0",
            "PI0REMOTE_QUIC_PORT": "0",
            "PI0REMOTE_PORTALS": "tcp",
            "PI0REMOTE_HEARTBEAT_S": "0",
            "PI0REMOTE_MAX_BATCH": "4",
        }
    )
    store: dict[str, Any] = {}
    with deploy.start_from_config(
        cfg, store=store, forward=LocalForward(), token=TOKEN, host="127.0.0.1"
    ) as c:
        assert type(c.core.policy).__name__ == "ZerosPolicy"
        assert c.server.transports == ("tcp",) and c.core.runner.max_batch == 4
        meta = c.core.metadata()
        assert meta["auth"] is True and meta["policy"]["name"] == "zeros"
        (entry,) = store.values()
        assert entry["policy"] == "zeros" and list(entry["portals"]) == ["tcp"]
        with connect("modal://pi0remote/tcp", modal_store=store, token=TOKEN) as client:
            assert client.infer(make_obs(0))["action"].shape == (50, 14)


def test_startup_refuses_public_portals_without_token() -> None:
    store: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="token"):
        deploy.start_container(ProbePolicy(), store=store, forward=LocalForward(), token=None, tcp_port=0)
    assert store == {}


def test_startup_failure_closes_what_it_opened() -> None:
    def broken_forward(port: int):
        raise OSError("tunnel refused")

    store: dict[str, Any] = {}
    with pytest.raises(OSError, match="tunnel refused"):
        deploy.start_container(
            ProbePolicy(),
            store=store,
            forward=broken_forward,
            token=TOKEN,
            host="127.0.0.1",
            tcp_port=0,
            portals=("tcp",),
        )
    assert store == {}


def test_prune_removes_only_long_dead_containers() -> None:
    now = time.time()
    store = {
        "alive": {"heartbeat": now - 5},
        "dead": {"heartbeat": now - deploy.PRUNE_AFTER_S - 1},
        "garbage": "not an entry",
    }
    assert sorted(deploy.prune_stale(store, now=now)) == ["dead", "garbage"]
    assert list(store) == ["alive"]


# --------------------------------------------------------------------------------------------------------------
# the ASGI front, under uvicorn on loopback


class UvicornThread:
    def __init__(self, app: Any) -> None:
        import uvicorn

        ws = "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "websockets"
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws=ws, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def web_deployment():
    pytest.importorskip("uvicorn")
    store: dict[str, Any] = {}
    container = deploy.start_container(
        ProbePolicy(),
        store=store,
        forward=LocalForward(),
        token=TOKEN,
        container_id="ta-web",
        host="127.0.0.1",
        tcp_port=0,
        portals=("tcp",),
        heartbeat_s=0,
    )
    try:
        with UvicornThread(container.asgi_app) as base:
            yield types.SimpleNamespace(base=base, container=container, store=store)
    finally:
        container.close()


@pytest.mark.parametrize("scheme", ["http", "ws"])
def test_asgi_front_serves_the_real_clients(web_deployment, scheme: str) -> None:
    base = web_deployment.base
    url = base if scheme == "http" else "ws" + base[len("http") :] + "/ws"
    obs = make_obs(7)
    with connect(url, token=TOKEN) as client:
        assert client.metadata["policy"]["name"] == "probe"
        reply = client.infer(obs)
        client.reset()
    np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))
    assert reply["cam_sum"] == int(obs["cam_high"].sum(dtype=np.int64))
    assert {"decode_ms", "queue_ms", "policy_ms", "encode_ms", "total_ms"} <= set(reply["server_timing"])
    with pytest.raises(AuthenticationError):
        connect(url, token="wrong")
    with pytest.raises(AuthenticationError):
        connect(url)


def test_asgi_front_endpoints(web_deployment) -> None:
    base = web_deployment.base
    with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    req = urllib.request.Request(
        base + "/metadata", headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        meta = json.loads(resp.read())
    assert meta["auth"] is True and meta["deployment"]["container_id"] == "ta-web"
    for path, status in (("/metadata", 401), ("/nope", 404)):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(
                urllib.request.Request(base + path, headers={"Accept": "application/json"}), timeout=5
            )
        assert info.value.code == status
    req = urllib.request.Request(base + "/infer", headers={"Authorization": f"Bearer {TOKEN}"})  # GET
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 405
    bad = urllib.request.Request(
        base + "/infer",
        data=b"\xc1",
        method="POST",
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Accept": "application/json",
            "Content-Type": "application/msgpack",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=5)
    assert info.value.code == 400 and json.loads(info.value.read())["type"] in (
        "codec",
        "protocol",
        "invalid_input",
    )


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_modal_url_for_web_transports(web_deployment, monkeypatch, transport: str) -> None:
    # Modal's web URL cannot exist here: the SDK lookup is the one thing replaced, by the local ASGI server.
    looked_up = []

    def fake_web_url(app: str, environment: str | None = None) -> str:
        looked_up.append((app, environment))
        return web_deployment.base + "/"

    monkeypatch.setattr(modal_client, "web_url", fake_web_url)
    resolved, extra = modal_client.resolve_modal_url(f"modal://pi0remote/{transport}?environment=dev")
    assert looked_up == [("pi0remote", "dev")]
    if transport == "ws":
        assert resolved == "ws" + web_deployment.base[len("http") :] + "/ws"
    else:
        assert resolved == web_deployment.base
    obs = make_obs(9)
    with connect(f"modal://pi0remote/{transport}", token=TOKEN) as client:
        reply = client.infer(obs)
    np.testing.assert_array_equal(reply["action"], expected_action(obs["state"]))


def test_asgi_app_in_process() -> None:
    """The adapter on the caller's loop (no uvicorn): lifespan, health, auth, the 401 upgrade refusal."""

    from pi0remote.server.core import ServerCore

    core = ServerCore(ProbePolicy(), name="probe", token=TOKEN)
    core.ready = True
    app = deploy.PolicyAsgiApp(core)

    async def call(scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        queue = list(incoming)

        async def receive() -> dict[str, Any]:
            return queue.pop(0) if queue else {"type": "websocket.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    async def main() -> None:
        sent = await call({"type": "lifespan"}, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        sent = await call({"type": "http", "path": "/healthz", "method": "GET", "headers": []}, [])
        assert sent[0]["status"] == 200
        auth = [(b"authorization", f"Bearer {TOKEN}".encode())]
        body = pi0remote.codec.packb(make_obs(1))
        sent = await call(
            {"type": "http", "path": "/infer", "method": "POST", "headers": auth},
            [
                {"type": "http.request", "body": body[:1000], "more_body": True},
                {"type": "http.request", "body": body[1000:], "more_body": False},
            ],
        )
        assert sent[0]["status"] == 200
        reply = pi0remote.codec.unpackb(sent[1]["body"])
        np.testing.assert_array_equal(reply["action"], expected_action(make_obs(1)["state"]))
        small = deploy.PolicyAsgiApp(core, max_message_bytes=100)
        sent_small: list[dict[str, Any]] = []

        async def recv_big() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_small(m: dict[str, Any]) -> None:
            sent_small.append(m)

        await small(
            {"type": "http", "path": "/infer", "method": "POST", "headers": auth}, recv_big, send_small
        )
        assert sent_small[0]["status"] == 413
        ws_scope = {
            "type": "websocket",
            "path": "/ws",
            "headers": [],
            "extensions": {"websocket.http.response": {}},
        }
        sent = await call(ws_scope, [{"type": "websocket.connect"}])
        assert sent[0] == {**sent[0], "type": "websocket.http.response.start", "status": 401}

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------------------
# resolving modal:// URLs against a store the test controls


def _entry(cid: str, started: float, beat: float, **portals: str) -> dict[str, Any]:
    return {
        "container_id": cid,
        "started_at": started,
        "heartbeat": beat,
        "portals": {k.replace("_", "+"): v for k, v in portals.items()},
        "quic_fingerprint": "ab" * 32,
    }


def test_resolver_picks_a_live_portal_by_load() -> None:
    now = time.time()
    store = {
        "old": _entry("old", now - 3600, now - 2, tcp="old.host:1000"),
        "new": _entry("new", now - 60, now - 1, tcp="new.host:2000", quic_tcp="new.host:2001"),
        "dead": _entry("dead", now - 10, now - 500, tcp="dead.host:3000"),  # stale heartbeat
    }
    store["old"]["load"] = {"robots": 6, "capacity": 8, "ready": True}
    store["new"]["load"] = {"robots": 1, "capacity": 8, "ready": True}
    for _ in range(5):  # two live candidates: the less loaded one, every time
        url = modal_client.resolve_modal_url("modal://pi0remote/tcp", modal_store=store)[0]
        assert url == "tcp://new.host:2000"
    url, extra = modal_client.resolve_modal_url("modal://pi0remote/quic+tcp", modal_store=store)
    assert url == "quic+tcp://new.host:2001" and extra["quic_fingerprint"] == "ab" * 32
    del store["new"]
    assert (
        modal_client.resolve_modal_url("modal://pi0remote/tcp", modal_store=store)[0] == "tcp://old.host:1000"
    )
    # a longer max_age brings the stale one back (no load published: counts as empty), and pin= picks it
    url, _ = modal_client.resolve_modal_url("modal://pi0remote/tcp?max_age=1000&pin=dead", modal_store=store)
    assert url == "tcp://dead.host:3000"


def test_resolver_fails_clearly() -> None:
    now = time.time()
    with pytest.raises(ConnectError, match="no container has published"):
        modal_client.resolve_modal_url("modal://pi0remote/tcp", modal_store={})
    stale = {"a": _entry("a", now - 900, now - 900, tcp="h:1")}
    with pytest.raises(ConnectError, match="ready with a heartbeat younger than 60 s"):
        modal_client.resolve_modal_url("modal://pi0remote/tcp", modal_store=stale)
    tcp_only = {"a": _entry("a", now, now, tcp="h:1")}
    with pytest.raises(ConnectError, match="no live quic\\+tcp portal"):
        modal_client.resolve_modal_url("modal://pi0remote/quic+tcp", modal_store=tcp_only)
    no_fp = {"a": dict(_entry("a", now, now, quic_tcp="h:1"), quic_fingerprint=None)}
    with pytest.raises(ConnectError, match="fingerprint"):
        modal_client.resolve_modal_url("modal://pi0remote/quic+tcp", modal_store=no_fp)
    for bad in ("modal://pi0remote", "modal:///tcp", "modal://pi0remote/udp", "modal://a/b/c"):
        with pytest.raises(ValueError):
            modal_client.resolve_modal_url(bad, modal_store={})
    # connect() surfaces the same error
    with pytest.raises(ConnectError, match="modal deploy -m pi0remote.modal_app"):
        connect("modal://pi0remote/tcp", modal_store={})


def test_resolver_token_from_environment(monkeypatch) -> None:
    now = time.time()
    store = {"a": _entry("a", now, now, tcp="h:1")}
    monkeypatch.setenv("PI0REMOTE_TOKEN", "from-env")
    assert modal_client.resolve_modal_url("modal://pi0remote/tcp", modal_store=store)[1] == {
        "token": "from-env"
    }
    monkeypatch.delenv("PI0REMOTE_TOKEN")
    assert modal_client.resolve_modal_url("modal://pi0remote/tcp", modal_store=store)[1] == {}


def test_connect_uses_token_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("PI0REMOTE_TOKEN", TOKEN)
    store: dict[str, Any] = {}
    with deploy.start_container(
        ProbePolicy(), store=store, forward=LocalForward(), token=TOKEN, host="127.0.0.1", tcp_port=0,
        portals=("tcp",), heartbeat_s=0,
    ):  # fmt: skip
        with connect("modal://pi0remote/tcp", modal_store=store) as client:
            assert client.infer(make_obs(0))["action"].shape == (50, 14)


def test_resolver_without_modal_credentials_fails_clearly(tmp_path) -> None:
    code = (
        "from pi0remote import connect, ConnectError\n"
        "for url in ('modal://pi0remote/tcp', 'modal://pi0remote/ws'):\n"
        "    try:\n"
        "        connect(url)\n"
        "    except ConnectError as exc:\n"
        "        print('ConnectError', exc)\n"
    )
    proc = _run_python(code, _no_modal_env(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("ConnectError") for line in lines), proc.stdout
    assert "endpoints of Modal app 'pi0remote'" in lines[0] and "web endpoint" in lines[1]
    assert all("modal token new" in line for line in lines)


def test_names_agree_between_app_and_resolver(modal_app) -> None:
    assert modal_client.CLASS_NAME == modal_app.CLASS_NAME == "Pi0Server"
    assert modal_client.WEB_METHOD == modal_app.WEB_METHOD == "web"
    assert hasattr(synchronizer._translate_in(modal_app.Pi0Server)._user_cls, modal_client.WEB_METHOD)
    assert modal_app.CONFIG.endpoints_name == deploy.endpoints_store_name("pi0remote")
