"""Command line: ``python -m swr_array {info,demo,bench}``."""

from __future__ import annotations

import argparse
import sys

from . import cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swr_array", description=cli.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends work here, and why not")
    demo = sub.add_parser("demo", help="run SWR (and Phalanx) on the best backend, check them")
    demo.add_argument("--cpu", action="store_true", help="use the NumPy reference even on a GPU")
    bench = sub.add_parser("bench", help="benchmark against peers and the memory floor (GPU)")
    try:
        from . import bench as bench_mod
    except ImportError as exc:  # the harness needs only the standard library to parse arguments
        bench_mod = None
        bench.set_defaults(bench_error=str(exc))
    else:
        bench_mod.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        return cli.info()
    if args.command == "demo":
        return cli.demo(force_cpu=args.cpu)
    if bench_mod is None:
        print(f"bench is unavailable: {args.bench_error}", file=sys.stderr)
        return 2
    return bench_mod.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
