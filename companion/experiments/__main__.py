"""Command line: ``python -m companion.experiments NAME [--full] [--seeds N] [--out FILE]``."""

from __future__ import annotations

import argparse
import json
import sys

from companion.experiments import _jsonable, available, run_experiment, save_results


def main(argv: list[str] | None = None) -> int:
    experiments = available()
    parser = argparse.ArgumentParser(
        prog="python -m companion.experiments",
        description="Run one of the book's experiments and print or save its results as JSON.",
        epilog="experiments: " + "; ".join(f"{name}: {text}" for name, text in experiments.items()),
    )
    parser.add_argument("name", choices=sorted(experiments), help="which experiment")
    parser.add_argument("--full", action="store_true", help="full scale (minutes) instead of CI scale (seconds)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    parser.add_argument("--out", help="write the JSON here instead of printing it")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1; received {args.seeds}")
    result = run_experiment(args.name, full=args.full, seeds=args.seeds)
    if args.out:
        save_results(result, args.out)
        print(f"{args.name}: {result['wall_time_s']} s, written to {args.out}")
    else:
        json.dump(_jsonable(result), sys.stdout, indent=1, allow_nan=False)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
