"""`python -m bench.data check NAME data.root=PATH [data.split=val] [--samples N]`: what a dataset layout holds
(bench.data.check); a missing or malformed layout is one line naming the expected path and how to prepare it
(exit 2)."""

from __future__ import annotations

import argparse
import sys

from bench.errors import cli_exit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check_parser = sub.add_parser("check", help="say what a dataset layout holds")
    check_parser.add_argument("name", help="a registered dataset (voc2012, context59, coco_stuff27, ...)")
    check_parser.add_argument("options", nargs="*", help="data.root=PATH, data.split=val, ...")
    check_parser.add_argument("--samples", type=int, default=16, help="label maps read for class frequencies")
    args = parser.parse_args(argv)

    def work() -> str:
        from bench.data.check import check, parse_overrides

        return check(args.name, parse_overrides(args.options), samples=max(1, args.samples))

    return cli_exit(work)


if __name__ == "__main__":
    sys.exit(main())
