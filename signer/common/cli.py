"""The ``keyward`` command.

Each package contributes its subcommands through the ``keyward.commands`` entry-point
group (see pyproject.toml): ``signer.cli:register`` adds ``signer`` and ``keys``,
``gateway.cli:register`` adds ``gateway``, ``demo``, ``ping``, ``test-keyserver`` and
``bench``. This module knows neither package, so the dependency rule holds: the
gateway may import the signer's public API, the signer never imports the gateway.
A package whose dependencies are not installed (a gateway-only install has no
python-pkcs11) still registers its commands; they fail with a clear message when run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from signer.common.config import ConfigError
from signer.common.logs import LEVELS, setup_logging
from signer.common.process import ServiceError
from signer.common.tls import TLSConfigError

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A failure to report to the user in one line, without a traceback."""


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LEVELS, default=None, help="default: info")
    parser.add_argument("--log-format", choices=("text", "json"), default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyward",
        description="Keyward: a keyless-SSL key server with HSM-backed signers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for ep in sorted(entry_points(group="keyward.commands"), key=lambda e: e.name):
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]
        register = ep.load()
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(
        getattr(args, "log_level", None) or "info", getattr(args, "log_format", None) or "text"
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, TLSConfigError, CommandError, ServiceError) as e:
        print(f"keyward {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as `python -m signer.common.cli`, this file is the module __main__; hand over
    # to the real signer.common.cli so that its exception classes are the ones the
    # subcommands raise.
    from signer.common.cli import main as _main

    sys.exit(_main())
