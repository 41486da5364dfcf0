"""Command line: ``python -m samplers {demo,bench,sample,grid} ...``.

Each subcommand lives in its own module of :mod:`samplers.cli` with a ``main(argv) -> int``; it is
imported only when it is run, so ``python -m samplers demo`` does not import the benchmark code and
vice versa, and ``import samplers`` imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help); the module's ``main(argv)`` gets the remaining arguments
COMMANDS = {
    "demo": ("samplers.cli.demo", "sample an exact 2-D mixture with every solver; error vs NFE table and plot"),
    "bench": ("samplers.cli.bench", "measurements (e.g. 'bench overhead'); see 'bench --help'"),
    "sample": ("samplers.cli.sample", "sample your own network to checksummed shard files (resumable; torchrun)"),
    "grid": ("samplers.cli.grid", "fit a time grid to a network at a given NFE (optimize_grid) and save it as JSON"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m samplers",
        description="Numerical SDE/ODE samplers for score-based diffusion models.",
        epilog="Run 'python -m samplers COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # add_help=False: '--help' after the command goes to the command's own parser
        sub.add_parser(name, help=help_text, add_help=False)
    # parse only the command name; everything after it belongs to the subcommand
    args, rest = parser.parse_known_args(argv[:1])
    rest = rest + argv[1:]
    module_name = COMMANDS[args.command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        parser.error(f"the '{args.command}' command is not available ({module_name} is missing)")
    code = module.main(rest)
    return 0 if code is None else int(code)


if __name__ == "__main__":
    raise SystemExit(main())
