"""The ``pi0remote`` command as a user runs it: every subcommand's ``--help`` and a short real run against a
real loopback server, the shared flags (token, QUIC trust, output), and each command-line error being one
line that names the cause and the fix (exit code 2 for usage errors)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from conftest import HAVE_QUIC, make_obs
from pi0remote import cli, connect
from pi0remote.harness.procs import ServerProcess

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["serve", "bench", "eval", "record"]

# Makes the named top-level modules look uninstalled (the real import machinery refuses them), then runs
# the pi0remote command in that process: how an install without an extra behaves.
WITHOUT = """
import sys
blocked = set(sys.argv[1].split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from pi0remote.cli import main
sys.exit(main(sys.argv[2:]))
"""


def pi0remote(*argv: str, env: dict[str, str] | None = None, without: str = "", timeout: float = 120):
    """Run ``python -m pi0remote ARGV`` (with ``without`` modules uninstalled) and return the result."""
    cmd = (
        [sys.executable, "-c", WITHOUT, without, *argv]
        if without
        else [sys.executable, "-m", "pi0remote", *argv]
    )
    base = {k: v for k, v in os.environ.items() if k not in ("PI0REMOTE_TOKEN", "TQDM_DISABLE")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})})


def usage(capsys, *argv: str) -> subprocess.CompletedProcess:
    """Run ``pi0remote ARGV`` in this process up to its usage error; the result as a subprocess would give it."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, exit_.value.code, captured.out, captured.err)


def assert_one_line_error(out: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit ``code``, no traceback, and one ``error:`` line on stderr that contains every needle."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, out.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    """``pi0remote serve`` with a token read from ``--token-file``: TCP and HTTP/WebSocket."""
    path = tmp_path_factory.mktemp("tok") / "token.txt"
    path.write_text("s3cret\n")
    with ServerProcess(
        ["--policy", "zeros", "--http-port", "0", "--tcp-port", "0", "--token-file", str(path)]
    ) as srv:
        yield srv, path


# -- the entry point --------------------------------------------------------------------------------
def test_console_script_and_module_forms() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["pi0remote"].partition(":")
    assert (module, attr) == ("pi0remote.cli", "main")
    top = pi0remote("--help")
    assert top.returncode == 0
    for command in [*COMMANDS, "version"]:
        assert command in top.stdout
    from pi0remote import __version__

    assert pi0remote("--version").stdout.strip() == f"pi0remote {__version__}"
    assert pi0remote("version").stdout.strip() == f"pi0remote {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_the_shared_flags_and_defaults(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "(default:" in text and "--debug" in text and "-q, --quiet" in text
    if command != "serve":
        for flag in ("--url URL, --policy-url URL", "--token", "--token-file", "--quic-fingerprint",
                     "--quic-cafile", "--quic-insecure", "--timeout", "--out", "--json"):  # fmt: skip
            assert flag in text, flag
    else:
        assert "--token-file" in text and "--transports" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_default_is_in_the_help(command: str) -> None:
    import argparse

    parser = cli.command_parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS, []):
            assert "%(default)" in (formatter._get_help_string(action) or ""), action.option_strings


@pytest.mark.parametrize("command", COMMANDS)
def test_python_dash_m_forms_keep_working(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", f"pi0remote.{command}", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and f"python -m pi0remote.{command}" in out.stdout


# -- serve ----------------------------------------------------------------------------------------
def test_serve_tcp_port_alone_opens_only_tcp() -> None:
    with ServerProcess(["--tcp-port", "0"]) as srv:
        assert len(srv.urls) == 1 and srv.urls[0].startswith("tcp://127.0.0.1:")
        with connect(srv.urls[0]) as client:
            assert client.infer(make_obs(0))["action"].shape == (50, 14)


@pytest.mark.skipif(not HAVE_QUIC, reason="needs aioquic")
def test_serve_quic_port_does_not_open_quic_that_transports_leaves_out() -> None:
    with ServerProcess(["--tcp-port", "0", "--quic-port", "0", "--transports", "tcp"]) as srv:
        assert [u.split("://")[0] for u in srv.urls] == ["tcp"]
        assert any("--quic-port ignored" in line for line in srv.lines)
    with ServerProcess(["--quic-port", "0"]) as srv:  # the port flag alone selects its transports
        assert [u.split("://")[0] for u in srv.urls] == ["quic", "quic+tcp"]


def test_serve_on_every_interface_prints_a_usable_url() -> None:
    with ServerProcess(["--host", "0.0.0.0", "--tcp-port", "0"]) as srv:
        (url,) = srv.urls
        assert "127.0.0.1" not in url and "0.0.0.0" not in url
        assert any("bound to 0.0.0.0" in line for line in srv.lines)
        with connect(url) as client:
            assert client.infer(make_obs(0))["action"].shape == (50, 14)


def test_serve_port_in_use_names_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = pi0remote("serve", "--tcp-port", str(port))
    assert_one_line_error(out, 1, f"port {port}", "--tcp-port", "0 picks a free one")


def test_serve_bad_values_are_usage_errors(capsys) -> None:
    line = assert_one_line_error(usage(capsys, "serve", "--policy", "nope"), 2, "'nope'")
    for name in ("zeros", "echo", "expert", "pi0", "sleep:MS", "module:attr"):
        assert name in line
    assert_one_line_error(usage(capsys, "serve", "--transports", "tcp,grpc"), 2, "grpc", "quic+tcp")
    assert_one_line_error(pi0remote("serve", "--policy", "no_such_module:thing"), 2, "no_such_module")
    assert_one_line_error(usage(capsys, "serve", "--token-file", "/nonexistent/tok"), 2, "--token-file")


def test_serve_debug_shows_the_traceback() -> None:
    out = pi0remote("serve", "--debug", "--policy", "pi0remote.policies.builtin:NoSuchPolicy")
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_serve_reads_the_token_from_the_environment() -> None:
    from pi0remote import AuthenticationError

    with ServerProcess(["--tcp-port", "0"], env={"PI0REMOTE_TOKEN": "from-env"}) as srv:
        with pytest.raises(AuthenticationError):
            connect(srv.urls[0])
        with connect(srv.urls[0], token="from-env") as client:
            assert client.infer(make_obs(0))["action"].shape == (50, 14)


# -- bench ----------------------------------------------------------------------------------------
def _bench(tmp_path: Path, capsys, *argv: str) -> dict:
    rc = cli.main(["bench", *argv, "--n", "2", "--warmup", "0", "--rounds", "1", "--no-baselines",
                   "--no-charts", "--json", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_in_process_runs_leave_the_environment_alone(tmp_path, capsys) -> None:
    before = os.environ.get("TQDM_DISABLE")
    _bench(tmp_path, capsys, "--transport", "local")
    assert os.environ.get("TQDM_DISABLE") == before


def test_bench_reaches_a_token_server_by_flag_file_and_env(
    token_server, tmp_path, capsys, monkeypatch
) -> None:
    srv, path = token_server
    tcp, ws = srv.url("tcp"), srv.url("ws")
    doc = _bench(tmp_path, capsys, "--url", tcp, "--policy-url", ws, "--token-file", str(path))
    assert [t["transport"] for t in doc["transports"]] == ["tcp", "ws"] and doc["transports"][0]["n"] == 2
    assert _bench(tmp_path, capsys, "--url", tcp, "--token", "s3cret")["transports"][0]["n"] == 2
    monkeypatch.setenv("PI0REMOTE_TOKEN", "s3cret")
    assert _bench(tmp_path, capsys, "--url", tcp)["transports"][0]["n"] == 2


def test_bench_without_the_token_is_one_line(token_server) -> None:
    srv, _ = token_server
    out = pi0remote("bench", "--url", srv.url("tcp"), "--n", "1", "--no-progress")
    assert_one_line_error(out, 1, "--token", "--token-file", "PI0REMOTE_TOKEN")


def test_bench_unreachable_and_mismatched_urls_are_one_line(token_server) -> None:
    srv, _ = token_server
    out = pi0remote("bench", "--url", "tcp://127.0.0.1:1", "--n", "1", "--timeout", "1")
    assert_one_line_error(out, 1, "tcp://127.0.0.1:1", "--url")
    http_port = srv.url("http").rsplit(":", 1)[1]
    out = pi0remote("bench", "--url", f"tcp://127.0.0.1:{http_port}", "--n", "1", "--timeout", "5")
    assert_one_line_error(out, 1, f"tcp://127.0.0.1:{http_port}", f"http://127.0.0.1:{http_port}")
    tcp_port = srv.url("tcp").rsplit(":", 1)[1]
    out = pi0remote("bench", "--url", f"http://127.0.0.1:{tcp_port}", "--n", "1", "--timeout", "5")
    assert_one_line_error(out, 1, f"http://127.0.0.1:{tcp_port}", f"tcp://127.0.0.1:{tcp_port}")


def test_bench_bad_values_are_argparse_errors(capsys) -> None:
    assert_one_line_error(usage(capsys, "bench", "--transport", "grpc"), 2, "--transport", "grpc", "tcp, ws")
    assert_one_line_error(usage(capsys, "bench", "--netem", "lag=5ms"), 2, "--netem", "'lag'", "delay")
    assert_one_line_error(usage(capsys, "bench", "--n", "0"), 2, "--n")
    assert_one_line_error(usage(capsys, "bench", "--policy", "nope"), 2, "'nope'", "sleep:MS")
    assert_one_line_error(usage(capsys, "bench", "--url", "grpc://h:1"), 2, "--url", "'grpc://h:1'", "tcp://")


@pytest.mark.skipif(not HAVE_QUIC, reason="needs aioquic")
def test_bench_quic_trust_flags(tmp_path, capsys) -> None:
    with ServerProcess(["--quic-port", "0"]) as srv:
        url, fingerprint = srv.url("quic"), srv.quic_fingerprint
        assert fingerprint and re.fullmatch(r"[0-9a-f]{64}", fingerprint)
        out = pi0remote("bench", "--url", url, "--n", "1", "--timeout", "5", "--no-progress")
        assert_one_line_error(out, 1, "--quic-fingerprint", "--quic-cafile", "--quic-insecure")
        doc = _bench(tmp_path, capsys, "--url", url, "--quic-fingerprint", fingerprint)
        assert doc["transports"][0]["transport"] == "quic" and doc["transports"][0]["n"] == 2
        assert _bench(tmp_path, capsys, "--url", url, "--quic-insecure")["transports"][0]["n"] == 2


def test_bench_says_what_is_missing_and_which_extra_brings_it(tmp_path) -> None:
    out = pi0remote("bench", "--transport", "tcp,quic", "--n", "1", "--warmup", "0", "--rounds", "1",
                    "--no-baselines", "--no-progress", "--out", str(tmp_path), without="aioquic,matplotlib")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pip install 'pi0remote[quic]'" in out.stderr and "pip install 'pi0remote[harness]'" in out.stderr
    assert "tcp" in out.stdout and "quic" not in out.stdout.split("results:")[0].split("\n", 1)[1]
    out = pi0remote("bench", "--url", "quic://127.0.0.1:1", without="aioquic")
    assert_one_line_error(out, 1, "pip install 'pi0remote[quic]'")


# -- eval and record ------------------------------------------------------------------------------
def test_eval_and_record_without_their_extras_name_them() -> None:
    out = pi0remote("eval", "--policy", "zeros", "--episodes", "1", without="gym_aloha")
    assert_one_line_error(out, 1, "gym_aloha", "pip install 'pi0remote[sim]'")
    out = pi0remote("eval", "--policy", "zeros", "--episodes", "1", without="matplotlib")
    assert_one_line_error(out, 1, "matplotlib", "pip install 'pi0remote[harness]'")
    out = pi0remote("record", "--policy", "zeros", "--episodes", "1", without="imageio_ffmpeg")
    assert_one_line_error(out, 1, "imageio_ffmpeg", "pip install 'pi0remote[sim]'")


def test_eval_bad_values_are_usage_errors(capsys) -> None:
    line = assert_one_line_error(usage(capsys, "eval", "--policy", "nope"), 2, "'nope'", "expert")
    assert "module:attr" in line
    assert_one_line_error(
        usage(capsys, "eval", "--policy", "zeros", "--compare", "nope"), 2, "--compare", "'nope'"
    )
    assert_one_line_error(usage(capsys, "eval", "--policy", "zeros", "--netem", "lag=1ms"), 2, "--netem")
    assert_one_line_error(usage(capsys, "eval"), 2, "--url", "--policy")


@pytest.mark.sim
@pytest.mark.slow
def test_eval_short_real_run_against_a_token_server(token_server, tmp_path) -> None:
    srv, path = token_server
    modes = [srv.url("tcp")]
    trust: list[str] = []
    with contextlib.ExitStack() as stack:
        if HAVE_QUIC:  # the same run also reaches a QUIC server with a self-signed certificate
            quic = stack.enter_context(ServerProcess(["--quic-port", "0", "--token-file", str(path)]))
            modes.append(quic.url("quic"))
            trust = ["--quic-fingerprint", quic.quic_fingerprint or ""]
        out = pi0remote("eval", "--policy-url", modes[0], *(["--compare", *modes[1:]] if modes[1:] else []), "--token-file", str(path),
                        *trust, "--episodes", "1", "--max-steps", "10", "--json", "--no-progress",
                        "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [a["mode"] for a in doc["results"]] == modes
    assert all(a["episodes"] == 1 for a in doc["results"])
    assert (Path(doc["results_dir"]) / "success_rate.png").exists()


@pytest.mark.sim
@pytest.mark.slow
def test_record_against_a_token_server_shows_progress_per_step(token_server, tmp_path) -> None:
    srv, path = token_server
    url = srv.url("tcp")
    out = pi0remote("record", "--url", url, "--token-file", str(path), "--episodes", "1", "--max-steps", "8",
                    "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert re.search(re.escape(url) + r" seed 0:.*/8", out.stderr), out.stderr[-2000:]  # a bar over the steps
    (folder,) = tmp_path.iterdir()
    (video,) = folder.glob("*_seed0.mp4")
    assert video.stat().st_size > 0 and (folder / "aggregate.json").exists()


def test_success_rate_labels_are_dark_and_above_their_bars() -> None:
    from matplotlib.colors import to_rgb

    from pi0remote.harness.eval import success_figure

    aggregates = [
        {"mode": "a", "success_rate": 0.0, "wilson95_low": 0.0, "wilson95_high": 0.43, "successes": 0, "episodes": 5},
        {"mode": "b", "success_rate": 1.0, "wilson95_low": 0.57, "wilson95_high": 1.0, "successes": 5, "episodes": 5},
    ]  # fmt: skip
    fig = success_figure(aggregates, "t")
    labels = {t.get_text(): t for t in fig.axes[0].texts}
    for agg in aggregates:
        text = labels[f"{agg['successes']}/{agg['episodes']}"]
        assert sum(to_rgb(text.get_color())) < 1.0  # dark text on the white background
        assert text.get_position()[1] > agg["wilson95_high"]  # above the bar and its error bar
        assert text.get_position()[1] < fig.axes[0].get_ylim()[1]
