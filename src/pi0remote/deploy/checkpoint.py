"""The checkpoint cache: the one-off download into a cache directory (a Modal Volume) by the setup function,
its lookup at container start (which never downloads), the configured policy built from it, and the
imports done ahead of a memory snapshot."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from .config import OPENPI_DATA_HOME, DeployConfig

logger = logging.getLogger("pi0remote.deploy")


def cached_checkpoint(url: str, data_home: str) -> str:
    """Where openpi's downloader keeps ``url`` under ``data_home`` (``$OPENPI_DATA_HOME/<bucket>/<path>``)."""
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        return parts.path if parts.scheme else url
    return os.path.join(data_home, parts.netloc, parts.path.strip("/"))


def fetch_checkpoint(url: str, data_home: str, *, tokenizer: bool = True) -> list[str]:
    """Download ``url`` (and PaliGemma's tokenizer) into ``data_home`` once, with openpi's own downloader.

    Runs in the deployment's setup function; the serving containers only read the cache.
    """
    os.environ[OPENPI_DATA_HOME] = data_home
    from openpi.shared import download  # type: ignore[import-not-found]

    paths = [str(download.maybe_download(url))]
    if tokenizer:
        paths.append(str(download.maybe_download(PALIGEMMA_TOKENIZER, gs={"token": "anon"})))
    return paths


PALIGEMMA_TOKENIZER = "gs://big_vision/paligemma_tokenizer.model"


def ensure_checkpoint(config: DeployConfig, fetch: Callable[[], Any] | None = None) -> str:
    """The local path of the configured checkpoint in the cache; never downloads it itself.

    When it is missing and ``fetch`` is given (on Modal: run the setup function, which downloads into the
    Volume and commits, then reload the Volume), ``fetch`` is called once and the cache checked again.
    """
    local = cached_checkpoint(config.checkpoint_url, config.openpi_data_home)
    if not os.path.isdir(local) and fetch is not None:
        logger.info(
            "checkpoint %s not cached at %s: running the setup function", config.checkpoint_url, local
        )
        fetch()
    if not os.path.isdir(local):
        raise FileNotFoundError(
            f"checkpoint {config.checkpoint_url} is not cached at {local}. Fetch it once into the "
            f"'{config.volume_name}' volume: modal run -m pi0remote.modal_app::fetch_checkpoint"
        )
    return local


def load_configured_policy(config: DeployConfig, fetch: Callable[[], Any] | None = None) -> Any:
    """Build the configured policy; a pi0 checkpoint is read from the cache (see :func:`ensure_checkpoint`)."""
    from ..policies import load_policy

    options = config.policy_options()
    if config.policy == "pi0" and not config.random_weights:
        os.environ.setdefault(OPENPI_DATA_HOME, config.openpi_data_home)
        options["checkpoint"] = ensure_checkpoint(config, fetch)
    return load_policy(config.policy, **options)


def preload_modules(names: Iterable[str]) -> list[str]:
    """Import heavy modules ahead of time (before a memory snapshot); returns those that imported."""
    import importlib

    done = []
    for name in names:
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module only costs start-up time later
            logger.info("preload: %s not imported (%s)", name, exc)
    return done
