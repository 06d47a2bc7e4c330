"""`python -m bench`: the benchmark suite (bench/suite.py), from a checkout of STIP; `stip bench` runs this.

`--part scale` takes the scale table's settings too (`--clients`, `--tokens`, `--rounds`, `--group`, `--vllm`).
A failure is one line on stderr and exit status 2, as `stip` commands do.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stip.errors import StipError


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run (CI)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"),
                    help="where results.md, results.json and plots go")
    ap.add_argument("--part", action="append", default=None,
                    help="run only this part (repeat it): server_cost, concurrent, end_to_end, protect, mpc, scale "
                         "(the full run leaves out concurrent: scale covers it)")
    scale = ap.add_argument_group("the scale part's settings")
    scale.add_argument("--clients", type=int, nargs="+", default=None, help="client counts (default 1 8)")
    scale.add_argument("--tokens", type=int, default=None, help="new tokens per client (default 32)")
    scale.add_argument("--rounds", type=int, default=None, help="rounds per group (default 3)")
    scale.add_argument("--group", choices=["transformers", "vllm"], action="append", default=None,
                       help="only this group of rows (repeat it; default both)")
    scale.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                       help="run the vLLM rows (default: yes, but not with --quick)")
    args = ap.parse_args(argv)
    args.scale = None
    overrides = {k: getattr(args, k) for k in ("clients", "tokens", "rounds", "vllm") if getattr(args, k) is not None}
    if args.group:
        overrides["groups"] = args.group
    if overrides:
        from bench.suite import FULL, QUICK

        args.scale = {**(QUICK if args.quick else FULL)["scale"], **overrides}
        if min(args.scale["clients"]) < 1 or args.scale["tokens"] < 2 or args.scale["rounds"] < 1:
            ap.error("--clients must be at least 1, --tokens at least 2, --rounds at least 1")
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse(argv)
    from bench.suite import run_bench

    try:
        run_bench(quick=args.quick, out=args.out, parts=args.part or None,
                  settings={"scale": args.scale} if args.scale else None)
    except StipError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
