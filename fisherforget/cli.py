"""Command line: ``fisherforget {doctor,build,demo}`` (also ``python -m fisherforget``). The
benchmarks are a folder of the checkout: ``python -m benchmarks`` there."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, command_line: Optional[str] = None) -> int:
    """Run a command; ``command_line`` is what results record as the command that produced them
    (default: ``fisherforget`` and ``argv``), for scripts that wrap a command."""
    parser = argparse.ArgumentParser(prog="fisherforget", description=__doc__)
    from fisherforget import __version__

    parser.add_argument("--version", action="version", version=f"fisherforget {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="versions, devices and which backends work here")
    commands.add_parser(
        "build", help="compile the CUDA kernels now (JIT, cached) when no prebuilt "
                      "fisherforget._C has them; backend 'auto' never compiles")
    demo = commands.add_parser(
        "demo", help="Learning With Forgetting: built-in benchmark, or a real model with --model")
    from fisherforget import demo as demo_module

    demo_module.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from fisherforget import doctor

        return doctor.main()
    if args.command == "build":
        from fisherforget.backends import cuda

        ok, message = cuda.build_kernels()
        print(f"fisherforget build: {message}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.command == "demo":
        args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
        args.command_line = command_line or shlex.join(["fisherforget", "demo", *args.argv])
        return demo_module.run(args)
    parser.error(f"unknown command {args.command}")
    return 2
