"""``pi0remote``: the one command-line entry point, its shared option groups and its error reporting.

``pi0remote serve|bench|eval|record|version`` (also ``python -m pi0remote`` and the older
``python -m pi0remote.serve`` etc. forms). Each command module provides ``add_arguments(parser)``,
``config_from_args(args, parser)`` (a typed config; bad values are usage errors) and ``execute(config)``;
this module builds the parsers, defines every option shared between commands exactly once, and turns
exceptions into one line naming the cause and the fix (tracebacks only with ``--debug``).
docs/cli.md lists the commands and the shared flags.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .options import TOKEN_ENV, ClientOptions, read_token

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pi0remote.serve", "serve one policy on HTTP, WebSocket, TCP and QUIC"),
    "bench": ("pi0remote.harness.bench.cli", "round-trip latency of every transport"),
    "eval": ("pi0remote.eval", "success rate of a policy on gym-aloha, through any transport"),
    "record": ("pi0remote.record", "MP4 videos of evaluation episodes"),
}
"""Subcommand -> (module with add_arguments / config_from_args / execute, one-line summary)."""

EXTRAS: dict[str, str] = {
    "aioquic": "quic",
    "gym_aloha": "sim",
    "mujoco": "sim",
    "dm_control": "sim",
    "imageio": "sim",
    "imageio_ffmpeg": "sim",
    "matplotlib": "harness",
    "simplejpeg": "harness",
    "PIL": "harness",
    "modal": "modal",
    "optax": "flow",
    "uvicorn": "dev",
}
"""Top-level module -> the pyproject extra that installs it."""
OTHER_FIXES: dict[str, str] = {
    "openpi": "openpi is not on the package index: install it from git as docs/pi0.md shows",
    "openpi_client": "pip install openpi-client (it pins numpy<2: use its own virtualenv, docs/openpi.md)",
    "jax": "install jax (docs/pi0.md for π₀)",
}
"""Modules no extra brings, and how to get them."""


SCHEME_PORTS = "tcp:// for --tcp-port, http:// or ws://.../ws for --http-port, quic:// for --quic-port"


class UsageError(Exception):
    """A bad command-line value found after parsing; reported like an argparse error (exit code 2)."""


# -- parsers ----------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every real default in ``--help`` (not ``None`` / ``False``) and keeps descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if action.nargs == 0:  # store_true / store_false / count: a switch, its default goes without saying
            return action.help
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default == []:
            return action.help  # flags (store_true / store_false) and "not set" say it in words
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit code 2) instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def show_defaults(p: argparse.ArgumentParser) -> None:
    """Give every option without a help text one that shows its default (argparse skips help-less ones)."""
    for action in p._actions:
        if action.help is None and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS, []):
            action.help = "(default: %(default)s)"


def new_parser(prog: str, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    return Parser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")


def server_url(text: str) -> str:
    """An argparse ``type`` for ``--url``: a URL whose scheme a client exists for."""
    from .client import SCHEMES

    known = [*SCHEMES, "modal"]
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if scheme not in known:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a server URL: use one of {', '.join(s + '://' for s in known)} (e.g. tcp://HOST:8765)"
        )
    return text


def add_target(p: Any, *, multiple: bool = False, help: str | None = None) -> None:
    """``--url`` (alias ``--policy-url``): the server to talk to."""
    p.add_argument(
        "--url", "--policy-url", dest="url", metavar="URL", type=server_url,
        action="append" if multiple else "store", default=[] if multiple else None,
        help=help or "a running server: tcp://HOST:8765, http://HOST:8000, ws://HOST:8000/ws, quic://, modal://",
    )  # fmt: skip


def add_auth(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    """``--token``, ``--token-file``; both fall back to ``$PI0REMOTE_TOKEN``."""
    g = p.add_argument_group("auth")
    what = "require this token from every client" if server else "send this token to the server"
    g.add_argument("--token", default=None, help=f"{what} (default: ${TOKEN_ENV} when set)")
    g.add_argument("--token-file", default=None, metavar="PATH", help="read the token from this file")


def add_quic_trust(p: argparse.ArgumentParser) -> None:
    """How a client trusts a QUIC server's certificate."""
    g = p.add_argument_group("QUIC trust (quic:// and quic+tcp:// URLs)")
    g.add_argument(
        "--quic-fingerprint", default=None, metavar="SHA256",
        help="trust the certificate with this SHA-256 fingerprint (serve prints 'quic fingerprint sha256:...')",
    )  # fmt: skip
    g.add_argument("--quic-cafile", default=None, metavar="PEM", help="trust certificates signed by this CA")
    g.add_argument("--quic-insecure", action="store_true", help="skip certificate checks (testing only)")


def add_timeout(p: Any, default: float = 30.0) -> None:
    p.add_argument("--timeout", type=float, default=default, metavar="S", help="per-call timeout, seconds")


def add_client_options(p: argparse.ArgumentParser, *, timeout: float = 30.0) -> None:
    """Auth, QUIC trust and ``--timeout``: everything a command that connects to a server needs."""
    add_auth(p)
    add_quic_trust(p)
    add_timeout(p.add_argument_group("connection"), timeout)


def add_output(
    p: argparse.ArgumentParser, *, out: str | None, json: bool = True, progress: bool = True
) -> None:
    """``--out``, ``--json``, ``--no-progress``, ``-q`` / ``-v``; ``out=None`` leaves ``--out`` out."""
    g = p.add_argument_group("output")
    if out is not None:
        g.add_argument("--out", default=out, metavar="DIR", help="parent of the timestamped results folder")
    if json:
        g.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    if progress:
        g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-q", "--quiet", action="store_true", help="only errors and results")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")


# -- from parsed arguments ------------------------------------------------------------------------
def token_from_args(args: argparse.Namespace) -> str | None:
    """``--token``, else ``--token-file``, else ``$PI0REMOTE_TOKEN`` (a bad file is a usage error)."""
    try:
        return read_token(getattr(args, "token", None), getattr(args, "token_file", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def client_options(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(
        timeout=getattr(args, "timeout", 30.0),
        token=token_from_args(args),
        quic_fingerprint=getattr(args, "quic_fingerprint", None),
        quic_cafile=getattr(args, "quic_cafile", None),
        quic_insecure=getattr(args, "quic_insecure", False),
    )


def configure_output(args: argparse.Namespace) -> None:
    """Apply ``-q`` / ``-v`` / ``--no-progress`` to this process (logging level, tqdm)."""
    verbose = getattr(args, "verbose", 0)
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # aioquic logs a refused certificate as a warning; the error line says it already
        logging.getLogger("quic").setLevel(logging.ERROR)
    if getattr(args, "no_progress", False) or getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar, in this process and its children


def logger(args: argparse.Namespace) -> Callable[[str], None]:
    """``log(msg)``: a line on stderr unless ``-q``."""
    quiet = getattr(args, "quiet", False)

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log


def choice_list(choices: Sequence[str], *, allow_all: bool = False) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma list drawn from ``choices`` (``all``: every choice)."""

    def parse(text: str) -> list[str]:
        items = [t.strip().lower() for t in text.split(",") if t.strip()]
        if allow_all and items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad or not items:
            known = ", ".join(choices) + (" or all" if allow_all else "")
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}: choose from {known}")
        return items

    return parse


def policy_name(text: str) -> str:
    """An argparse ``type`` for ``--policy``: a built-in name, ``sleep:MS[+PER]`` or ``module:attr``."""
    from .policies import BUILTIN

    if text.startswith("sleep:"):
        from .policies.builtin import SleepPolicy

        try:
            SleepPolicy.parse(text.removeprefix("sleep:"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    if text in BUILTIN or (":" in text and all(text.partition(":")[::2])):
        return text
    names = ", ".join([*BUILTIN, "sleep:MS", "sleep:BASE+PER"])
    raise argparse.ArgumentTypeError(f"unknown policy {text!r}; available: {names}, or module:attr")


def netem_spec(text: str) -> str:
    """An argparse ``type`` checking a netem spec (``delay=150ms,jitter=10ms,...``)."""
    from .harness.netem import NetemSpec

    try:
        NetemSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


# -- errors ---------------------------------------------------------------------------------------
def missing_extra(exc: ImportError) -> str | None:
    """``pip install 'pi0remote[EXTRA]'`` advice for a missing optional module, if it is one of ours."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRAS.get(name)
    return f"pip install 'pi0remote[{extra}]'" if extra else OTHER_FIXES.get(name)


def explain(exc: BaseException) -> str:
    """One line: what went wrong and what to do about it."""
    from . import errors

    text = str(exc) or type(exc).__name__
    if isinstance(exc, ImportError):
        fix = missing_extra(exc)
        return f"{text}: {fix}" if fix and "pip install" not in text else text
    if type(exc).__name__ == "TlsVerificationError":
        cause = text.split(". For a self-signed server", 1)[0]
        return (
            f"{cause}: pass --quic-fingerprint SHA256 (serve prints it as 'quic fingerprint sha256:...'), "
            "--quic-cafile PEM, or --quic-insecure"
        )
    if isinstance(exc, errors.AuthenticationError):
        return f"{text}: pass the server's token with --token, --token-file or ${TOKEN_ENV}"
    if isinstance(exc, errors.ConnectError):
        return f"{text}: is the server running? check --url (serve prints its URLs as 'listening URL')"
    if isinstance(exc, errors.RequestTimeout):
        return f"{text}: raise --timeout, or check that the URL's scheme matches the server's port ({SCHEME_PORTS})"
    if isinstance(exc, errors.ConnectionLost):
        return f"{text}: check that the URL's scheme matches the server's port ({SCHEME_PORTS})"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"{text}: pick another port (0 picks a free one)"
    return text.replace("\n", " ")


def _fail(prog: str, exc: BaseException, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(f"{prog}: error: {explain(exc)}", file=sys.stderr, flush=True)
    return 2 if isinstance(exc, UsageError) else 1


def run_command(module: Any, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Build the command's config (bad values: usage errors, exit 2), then execute it (errors: one line)."""
    debug = getattr(args, "debug", False)
    try:
        config = module.config_from_args(args, parser)
    except (UsageError, ValueError) as exc:
        if debug:
            raise
        parser.error(str(exc))
    tqdm_before = os.environ.get("TQDM_DISABLE")
    configure_output(args)
    try:
        return int(module.execute(config) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _fail(parser.prog, exc, debug)
    finally:  # a command run in process (tests, scripts) leaves the environment as it found it
        if tqdm_before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_before


# -- entry points ---------------------------------------------------------------------------------
def _module(command: str) -> Any:
    return importlib.import_module(COMMANDS[command][0])


def command_parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command, standalone (``python -m pi0remote.serve`` etc.)."""
    module = _module(command)
    p = new_parser(
        prog or f"pi0remote {command}", COMMANDS[command][1], epilog=getattr(module, "EXAMPLES", None)
    )
    module.add_arguments(p)
    add_debug(p)
    show_defaults(p)
    return p


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from . import __version__

    p = new_parser("pi0remote", "Run the pi0 robot policy on a remote GPU as if it were local (docs/cli.md).")
    p.add_argument("--version", action="version", version=f"pi0remote {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {}
    for name, (_, summary) in COMMANDS.items():
        module = _module(name)
        sp = sub.add_parser(
            name, help=summary, description=summary, epilog=getattr(module, "EXAMPLES", None),
            formatter_class=HelpFormatter,
        )  # fmt: skip
        module.add_arguments(sp)
        add_debug(sp)
        show_defaults(sp)
        parsers[name] = sp
    sub.add_parser("version", help="print the version", formatter_class=HelpFormatter)
    return p, parsers


def main(argv: Sequence[str] | None = None) -> int:
    """``pi0remote COMMAND ...``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["--version"], ["version"]):  # answered without building every command's parser
        from . import __version__

        print(f"pi0remote {__version__}")
        return 0
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        from . import __version__

        print(f"pi0remote {__version__}")
        return 0
    return run_command(_module(args.command), args, parsers[args.command])


def command_main(command: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """One command as its own program (``python -m pi0remote.<command>``)."""
    parser = command_parser(command, prog or f"python -m pi0remote.{command}")
    return run_command(_module(command), parser.parse_args(argv), parser)


__all__ = ["COMMANDS", "ClientOptions", "UsageError", "build_parser", "command_main", "explain", "main"]
