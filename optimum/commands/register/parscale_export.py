"""`optimum-cli export parscale MODEL OUT [options]`: parscale's exporter as an optimum-cli command.

optimum-cli imports every module of the `optimum.commands.register` namespace package (PEP 420:
no `__init__.py` at any level here) and registers the commands in its `REGISTER_COMMANDS`. This
module only declares the command; parscale (and torch) are imported when it runs.

The command hands its arguments to `parscale export` unchanged, so both take the same options and
fail with the same one-line errors and exit codes: `optimum-cli export parscale MODEL OUT --P 4
--int8` runs `parscale export MODEL -o OUT --P 4 --int8`.
"""

from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand

USAGE = "optimum-cli export parscale MODEL OUT [parscale export options: --P N --int8 ...]"


class ParScaleExportCommand(BaseOptimumCLICommand):
    """Export a ParScale checkpoint to ONNX with parscale's exporter."""

    COMMAND = CommandInfo(
        name="parscale",
        help="Export a ParScale (parallel scaling) checkpoint to ONNX with parscale's exporter.",
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.usage = USAGE
        parser.description = (
            "Runs `parscale export MODEL -o OUT [options]`; every option of `parscale export` is accepted "
            "after MODEL and OUT (see `parscale export --help`)."
        )
        # Everything is parsed by parscale itself: one set of options, help texts and errors.
        parser.add_argument("arguments", nargs=argparse.REMAINDER, metavar="MODEL OUT [options]")

    def run(self) -> None:
        args = list(self.args.arguments)
        positional = [a for a in args[:2] if not a.startswith("-")]
        if len(positional) < 2:
            self.parser.error("MODEL and OUT come first: " + USAGE)
        if any(a in ("-o", "--output") or a.startswith("--output=") for a in args[2:]):
            self.parser.error("OUT is the second positional argument; drop -o/--output")
        model, out, rest = args[0], args[1], args[2:]

        from parscale import cli  # torch and the exporter load only when the command runs

        sys.argv = ["parscale", "export", model, "-o", out, *rest]
        cli.main()


REGISTER_COMMANDS = [(ParScaleExportCommand, ExportCommand)]
