"""`python -m bench <name>`: run a benchmark, print its figures, keep them in bench/results/.

Each benchmark is a module `bench/<name>.py` with `add_arguments(parser)` and
`run(args) -> dict`. `python -m bench all` runs every one in turn.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from datetime import UTC, datetime
from typing import Any

from bench import stack

BENCHMARKS = ("accept", "memory", "drain", "accuracy", "latency", "scale")


def save(name: str, result: dict[str, Any]) -> None:
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {"benchmark": name, "at": stamp, "machine": stack.machine(), "result": result}
    stack.RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"
    (stack.RESULTS / f"{name}-{stamp}.json").write_text(text)
    (stack.RESULTS / f"{name}-latest.json").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="name", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        sub = commands.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(sub)
    commands.add_parser("all", help="every benchmark with its defaults")
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.name == "all" else (args.name,)
    met = True
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        if args.name == "all":
            sub_parser = argparse.ArgumentParser()
            module.add_arguments(sub_parser)
            run_args = sub_parser.parse_args([])
        else:
            run_args = args
        result = module.run(run_args)
        save(name, result)
        sys.stdout.write(f"== {name}\n{json.dumps(result, indent=2)}\n")
        met = met and bool(result.get("met", True))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
