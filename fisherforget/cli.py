"""Command line: ``fisherforget {doctor,demo}`` (also ``python -m fisherforget``)."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fisherforget", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="versions, devices and which backends work here")
    demo = commands.add_parser("demo", help="a small training run of a tiny causal LM")
    from fisherforget import demo as demo_module

    demo_module.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from fisherforget import doctor

        return doctor.main()
    if args.command == "demo":
        return demo_module.run(args)
    parser.error(f"unknown command {args.command}")
    return 2
