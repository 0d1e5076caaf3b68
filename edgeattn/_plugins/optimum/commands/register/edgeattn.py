"""``optimum-cli export edgeattn``: edgeattn's convert, where optimum users already look.

Installed as ``optimum.commands.register.edgeattn`` (optimum loads every module of that
namespace package at start-up, so this file imports nothing heavy until it runs).
"""

from __future__ import annotations

import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand


class EdgeattnExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="edgeattn",
        help="Rewrite attention for edge devices and export to ONNX with edgeattn "
             "(same options as `edgeattn convert`, e.g. MODEL -o OUT --kv-heads 1 --weights int4).",
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("arguments", nargs=argparse.REMAINDER,
                            help="arguments of `edgeattn convert` (see `edgeattn convert --help`)")

    def run(self) -> None:
        from edgeattn.cli import main

        main(["convert", *self.args.arguments], prog_name="optimum-cli export edgeattn")


REGISTER_COMMANDS = [(EdgeattnExportCommand, ExportCommand)]
