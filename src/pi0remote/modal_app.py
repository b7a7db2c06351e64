"""π₀ on a Modal GPU: ``modal deploy -m pi0remote.modal_app`` (``modal serve -m pi0remote.modal_app`` while developing).

What gets deployed (an app named ``pi0remote`` unless ``PI0REMOTE_APP`` says otherwise; docs/modal.md has the
whole story and every ``PI0REMOTE_*`` knob, see :class:`pi0remote.deploy.DeployConfig`):

* ``Pi0Server``: a GPU class (``H100`` unless ``PI0REMOTE_GPU``; region from ``PI0REMOTE_REGION``) that keeps
  ``min_containers=1`` warm. ``@modal.enter(snap=True)`` imports the heavy modules before the memory snapshot;
  ``@modal.enter()`` loads the checkpoint from the Volume, starts the :class:`~pi0remote.server.PolicyServer`,
  runs the JAX warm-up, opens one ``modal.forward(port, unencrypted=True)`` portal per raw transport
  (``tcp``, ``quic+tcp``) and publishes them in the ``<app>-endpoints`` ``modal.Dict`` under the container id
  (with a heartbeat); ``@modal.exit()`` unpublishes. Its ``web`` method is the ASGI app
  (``@modal.concurrent``) serving ``POST /infer``, ``GET /healthz``, ``GET /metadata`` and WebSocket ``/ws``.
* ``fetch_checkpoint``: the setup function that downloads the checkpoint (and tokenizer) into the Volume once,
  either by hand (``modal run -m pi0remote.modal_app::fetch_checkpoint``) or called by the very first container
  that finds the Volume empty. Cold starts read the Volume; the serving containers never download.
* The token: the Modal Secret ``pi0remote-token`` (``PI0REMOTE_SECRET``) must hold ``PI0REMOTE_TOKEN``; every
  transport requires it, and containers refuse to start without it.

Clients: ``pi0remote.connect("modal://pi0remote/tcp")`` (or ``/quic+tcp``, ``/ws``, ``/http``).

Importing this module defines the app without contacting Modal (no credentials needed).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import modal

from pi0remote import deploy, scaling

# The openpi commit the image installs: the one the pi0 backend is written against (docs/pi0.md).
try:
    from pi0remote.policies.pi0 import OPENPI_COMMIT as OPENPI_GIT_COMMIT
except ImportError:  # pragma: no cover - older backends
    try:
        from pi0remote.policies.pi0 import OPENPI_GIT_COMMIT  # type: ignore[no-redef]
    except ImportError:
        OPENPI_GIT_COMMIT = "15a9616a00943ada6c20a0f158e3adb39df2ccac"
try:
    from pi0remote.policies.pi0 import OPENPI_GIT
except ImportError:  # pragma: no cover
    OPENPI_GIT = "https://github.com/Physical-Intelligence/openpi"

CONFIG = deploy.DeployConfig.from_env()
DRAIN_S = 10.0
"""How long a stopping container waits for its robots to move before closing their connections."""
CLASS_NAME = "Pi0Server"
WEB_METHOD = "web"
OPENPI_DIR = "/opt/openpi"
JAX_CACHE_DIR = f"{CONFIG.cache_dir.rstrip('/')}/jax"

# pi0remote's own runtime dependencies (numpy comes with openpi, which pins it below 2).
PI0REMOTE_DEPS = (
    "msgpack>=1.0",
    "websockets>=14",
    "httpx>=0.27",
    "pydantic>=2",
    "tqdm>=4.60",
    "aioquic>=1.2",
)

PRELOAD_MODULES = (
    # Imported before the memory snapshot. Only modules that do not touch a JAX device at import time:
    # a JAX backend initialised while no GPU is attached would be captured CPU-only.
    "numpy",
    "msgpack",
    "websockets",
    "aioquic.quic.connection",
    "jax",
    "jax.numpy",
    "flax",
    "orbax.checkpoint",
    "sentencepiece",
    "pi0remote.server",
    "pi0remote.server.quic",
    "pi0remote.policies.pi0",
)


def openpi_install_commands(commit: str = OPENPI_GIT_COMMIT) -> list[str]:
    """Install openpi at ``commit`` into the image's Python with openpi's own lock file (``uv sync --frozen``).

    ``UV_PROJECT_ENVIRONMENT=/usr/local`` makes uv sync into the system interpreter Modal runs;
    ``--inexact`` keeps the packages already there; ``GIT_LFS_SKIP_SMUDGE=1`` as openpi's README asks.
    """
    return [
        f"git clone --filter=blob:none {OPENPI_GIT} {OPENPI_DIR}",
        f"git -C {OPENPI_DIR} checkout {commit}",
        f"cd {OPENPI_DIR} && GIT_LFS_SKIP_SMUDGE=1 UV_PROJECT_ENVIRONMENT=/usr/local "
        "uv sync --frozen --no-dev --inexact",
    ]


def build_base_image(config: deploy.DeployConfig = CONFIG) -> modal.Image:
    """Every build step: Debian, openpi at the pinned commit (pi0 only), pi0remote's dependencies."""
    image = modal.Image.debian_slim(python_version="3.11").apt_install("git", "git-lfs").pip_install("uv")
    if config.policy == "pi0":
        image = image.run_commands(*openpi_install_commands())
    return image.pip_install(*PI0REMOTE_DEPS).env(
        {
            deploy.OPENPI_DATA_HOME: config.openpi_data_home,
            # Compiled XLA programs persist on the Volume: later cold starts skip most of the compile.
            "JAX_COMPILATION_CACHE_DIR": JAX_CACHE_DIR,
            "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9",
        }
    )


base_image = build_base_image()
# This package from local source, added last (build steps cannot follow a local-source layer).
image = base_image.add_local_python_source("pi0remote")
# The setup function also needs gsutil: openpi fetches gs://openpi-assets with it.
fetch_image = base_image.pip_install("gsutil").add_local_python_source("pi0remote")
volume = modal.Volume.from_name(CONFIG.volume_name, create_if_missing=True)
token_secret = modal.Secret.from_name(CONFIG.secret_name)
# The image already carries pi0remote (add_local_python_source): no second, implicit copy of the package.
app = modal.App(CONFIG.app_name, image=image, include_source=False)


def _supported(fn: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Drop options this version of the SDK does not know (``modal>=1.0`` is the floor)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


CLS_OPTIONS: dict[str, Any] = _supported(
    app.cls,
    {
        "image": image,
        "gpu": CONFIG.gpu,
        "region": CONFIG.region,
        "routing_region": CONFIG.routing_region,
        "min_containers": CONFIG.min_containers,
        "max_containers": CONFIG.max_containers,
        "buffer_containers": CONFIG.buffer_containers,
        "scaledown_window": CONFIG.scaledown_window,
        "enable_memory_snapshot": CONFIG.memory_snapshot,
        "volumes": {CONFIG.cache_dir: volume},
        "secrets": [token_secret],
        "env": CONFIG.container_env(),
        # One input is one HTTP request or one whole WebSocket session: let sessions run long.
        "timeout": 24 * 3600,
        "startup_timeout": 30 * 60,
    },
)


@app.cls(**CLS_OPTIONS)
@modal.concurrent(max_inputs=CONFIG.max_inputs)
class Pi0Server:
    """One container: the policy server, its raw portals and the ASGI front for Modal's web endpoints."""

    @modal.enter(snap=CONFIG.memory_snapshot)
    def preload(self) -> None:
        # Before the memory snapshot (when enabled): no GPU is attached yet, so only imports happen here.
        self.preloaded = deploy.preload_modules(PRELOAD_MODULES)

    @modal.enter(snap=False)
    def start(self) -> None:
        config = deploy.DeployConfig.from_env()
        _check_jax_backend(config)
        volume.reload()  # see a checkpoint fetched after this container's snapshot was taken

        def fetch_once() -> None:
            # First deployment only: the setup function fills the Volume; later cold starts find it there.
            fetch_checkpoint.remote(config.checkpoint_url)
            volume.reload()

        self.container = deploy.start_from_config(
            config,
            store=modal.Dict.from_name(config.endpoints_name, create_if_missing=True),
            forward=lambda port: modal.forward(port, unencrypted=True),
            token=os.environ.get(deploy.TOKEN_ENV),
            fetch=fetch_once if config.auto_fetch else None,
        )

    @modal.asgi_app(requires_proxy_auth=CONFIG.proxy_auth)
    def web(self) -> Any:
        return self.container.asgi_app

    @modal.exit()
    def stop(self) -> None:
        container = getattr(self, "container", None)
        if container is not None:
            # unpublished first; the robots' clients see it within a second or two and move elsewhere
            container.close(drain_s=DRAIN_S)


def _check_jax_backend(config: deploy.DeployConfig) -> None:
    """A memory snapshot must not have captured a CPU-only JAX (see PRELOAD_MODULES)."""
    if config.gpu is None or config.policy != "pi0":
        return
    import sys

    jax = sys.modules.get("jax")
    if jax is None:
        return
    try:
        backend = jax.default_backend()
    except Exception:  # noqa: BLE001 - let the policy load report it
        return
    if backend == "cpu":
        raise RuntimeError(
            "JAX sees no GPU in this container (a memory snapshot may have captured a CPU-only JAX); "
            "redeploy with PI0REMOTE_MEMORY_SNAPSHOT=0 and report it"
        )


@app.function(
    image=fetch_image,
    volumes={CONFIG.cache_dir: volume},
    env=CONFIG.container_env(),
    timeout=3600,
)
def fetch_checkpoint(checkpoint: str = "") -> list[str]:
    """Download the checkpoint (default: the configured one) and PaliGemma's tokenizer into the Volume, once."""
    config = deploy.DeployConfig.from_env()
    paths = deploy.fetch_checkpoint(checkpoint or config.checkpoint_url, config.openpi_data_home)
    volume.commit()
    for path in paths:
        print(f"cached {path}")
    return paths


# The control loop: a light CPU function that reads the published loads and sets Pi0Server's autoscaler.
control_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("msgpack>=1.0", "numpy")
    .add_local_python_source("pi0remote")
)


def control_round() -> dict[str, Any]:
    """One round of the control loop: the published loads in, ``Pi0Server``'s autoscaler set (scaling.py)."""
    config = deploy.DeployConfig.from_env()
    server = modal.Cls.from_name(config.app_name, CLASS_NAME)()
    decision = scaling.autoscale_once(
        modal.Dict.from_name(config.endpoints_name, create_if_missing=True),
        server.update_autoscaler,
        config.scaling_policy(),
        modal.Dict.from_name(config.scaling_state_name, create_if_missing=True),
    )
    print(f"autoscaler: {decision.to_dict()}")
    return decision.to_dict()


def autoscale() -> dict[str, Any]:
    """The control loop, scheduled every ``PI0REMOTE_AUTOSCALE_S`` seconds."""
    return control_round()


if CONFIG.autoscale_s > 0:
    autoscale = app.function(
        image=control_image,
        schedule=modal.Period(seconds=CONFIG.autoscale_s),
        env=CONFIG.container_env(),
        timeout=120,
    )(autoscale)


__all__ = [
    "autoscale",
    "control_round",
    "CLASS_NAME",
    "CONFIG",
    "OPENPI_GIT_COMMIT",
    "WEB_METHOD",
    "Pi0Server",
    "app",
    "fetch_checkpoint",
    "image",
    "volume",
]
