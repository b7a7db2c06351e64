"""Latency benchmark: round trip, server time and overhead of every transport, in one run.

``pi0remote bench`` starts a policy server (a subprocess, built-in policy, loopback) and measures every
available transport against it; ``--url`` measures servers that already run. Everything is written to a
timestamped folder: ``results.json`` (per-call samples included), ``results.md`` and
``charts/latency_breakdown.png``.

Each call's time is split into client encode, network (transport time minus the server's total),
server decode, queue, policy, server encode and client decode. ``overhead`` is round trip minus the
server's reported total time; ``× floor`` is the median of (round trip − policy time) over a raw-socket
floor that sends the same bytes (measured in the same run, interleaved with the transports); ``×
openpi`` compares against openpi-client's ``WebsocketClientPolicy`` when ``openpi-client`` is installed.

``--clients N`` runs N client processes at once against one transport and reports aggregate
throughput and per-client latency (dynamic batching: ``--max-batch``, ``--batch-window-ms``).

The parts: :mod:`.config` (the typed :class:`BenchConfig`), :mod:`.rig` (payload, clients, embedded
server, baselines), :mod:`.measure` (the loops), :mod:`.report` (summaries, tables, files) and
:mod:`.cli` (flags -> config -> run).
"""

from __future__ import annotations

from .cli import BenchCommand, add_arguments, build_parser, config_from_args, execute, main, parse_config, run
from .config import (
    ALL_TRANSPORTS,
    SCHEMA,
    STAGE_LABELS,
    STAGES,
    BenchConfig,
    available_transports,
    parse_transports,
    quic_available,
)
from .measure import run_clients, run_latency
from .report import (
    TABLE_COLUMNS,
    describe_config,
    render_clients,
    render_markdown,
    render_table,
    write_outputs,
)
from .rig import Payload, call_record, make_obs

__all__ = [
    "ALL_TRANSPORTS",
    "SCHEMA",
    "STAGES",
    "STAGE_LABELS",
    "TABLE_COLUMNS",
    "BenchCommand",
    "BenchConfig",
    "Payload",
    "add_arguments",
    "build_parser",
    "available_transports",
    "call_record",
    "config_from_args",
    "describe_config",
    "execute",
    "main",
    "make_obs",
    "parse_config",
    "parse_transports",
    "quic_available",
    "render_clients",
    "render_markdown",
    "render_table",
    "run",
    "run_clients",
    "run_latency",
    "write_outputs",
]
