"""Command line: ``python -m companion.experiments NAME [--full] [--seeds N]
[--first-seed K] [--out FILE] [--rejudge FILE]``."""

from __future__ import annotations

import argparse
import json
import sys

from companion.experiments import (
    _jsonable,
    available,
    load_results,
    rejudge,
    run_experiment,
    save_results,
)


def main(argv: list[str] | None = None) -> int:
    """Run one experiment; print its JSON or write it to ``--out``."""
    experiments = available()
    parser = argparse.ArgumentParser(
        prog="python -m companion.experiments",
        description="Run one of the book's experiments and print or save "
        "its results as JSON.",
        epilog="experiments: "
        + "; ".join(f"{name}: {text}" for name, text in experiments.items()),
    )
    parser.add_argument("name", choices=sorted(experiments))
    parser.add_argument(
        "--full", action="store_true", help="full scale instead of CI scale"
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="number of seeds (default 5)"
    )
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds K..K+N-1 (default 0)"
    )
    parser.add_argument(
        "--out", help="write the JSON here instead of printing"
    )
    parser.add_argument(
        "--rejudge",
        metavar="FILE",
        help="run nothing: judge the runs stored in FILE again with the "
        "current claims and rule, and write the result back (or to --out)",
    )
    args = parser.parse_args(argv)
    if args.rejudge:
        result = rejudge(load_results(args.rejudge))
        if result["name"] != args.name:
            parser.error(
                f"{args.rejudge} holds {result['name']!r}, not {args.name!r}"
            )
        save_results(result, args.out or args.rejudge)
        print(
            f"{args.name}: judged again, written to {args.out or args.rejudge}"
        )
        return 0
    if args.seeds < 2:
        parser.error(f"--seeds must be >= 2; received {args.seeds}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0; received {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    result = run_experiment(args.name, full=args.full, seeds=seeds)
    if args.out:
        save_results(result, args.out)
        print(f"{args.name}: {result['wall_time_s']} s, written to {args.out}")
    else:
        json.dump(_jsonable(result), sys.stdout, indent=1, allow_nan=False)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
