"""`python -m bench <name>`: run a benchmark, print its figures, keep them in bench/results/.

Each benchmark is a module `bench/<name>.py` with `add_arguments(parser)` and
`run(args) -> dict`. `python -m bench all` runs every one in turn.

bench/results/ is ignored by git, so a run changes no tracked file. Figures worth keeping are
recorded on purpose with `--record`: the run's JSON (and the plots it names) are then also
copied to bench/recorded/, which is tracked, as `<name>-<time>.json` and `<name>-latest.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import stack

BENCHMARKS = (
    "accept",
    "memory",
    "drain",
    "accuracy",
    "latency",
    "scale",
    "receipts",
    "recipients",
    "redis-cost",
    "redis-instructions",
    "handover",
    "durability",
    "cluster",
)


def save(name: str, result: dict[str, Any], *, record: bool = False) -> list[Path]:
    """Write the run to bench/results/ (and to bench/recorded/ when asked); the files written."""
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    document = {"benchmark": name, "at": stamp, "machine": stack.machine(), "result": result}
    written = _write(stack.RESULTS, name, stamp, document)
    if record:
        recorded = _recorded_files(document)
        written += _write(stack.RECORDED, name, stamp, recorded)
    return written


def _write(directory: Path, name: str, stamp: str, record: dict[str, Any]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"
    paths = [directory / f"{name}-{stamp}.json", directory / f"{name}-latest.json"]
    for path in paths:
        path.write_text(text)
    return paths


def _recorded_files(value: Any) -> Any:
    """`value` with each file of bench/results/ it names copied to bench/recorded/ and renamed."""
    if isinstance(value, dict):
        return {k: _recorded_files(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_recorded_files(v) for v in value]
    if isinstance(value, str):
        repo = stack.RESULTS.parent.parent
        source = repo / value
        if source.parent == stack.RESULTS and source.is_file():
            stack.RECORDED.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, stack.RECORDED / source.name)
            return str((stack.RECORDED / source.name).relative_to(repo))
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="name", required=True)
    subs = []
    for name in BENCHMARKS:
        module = importlib.import_module(f"bench.{name.replace('-', '_')}")
        sub = commands.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(sub)
        subs.append(sub)
    subs.append(commands.add_parser("all", help="every benchmark with its defaults"))
    for sub in subs:
        sub.add_argument(
            "--record",
            action="store_true",
            help="also copy the figures to bench/recorded/ (tracked by git), to commit them",
        )
    args = parser.parse_args(argv)
    names = BENCHMARKS if args.name == "all" else (args.name,)
    met = True
    for name in names:
        module = importlib.import_module(f"bench.{name.replace('-', '_')}")
        if args.name == "all":
            sub_parser = argparse.ArgumentParser()
            module.add_arguments(sub_parser)
            run_args = sub_parser.parse_args([])
        else:
            run_args = args
        result = module.run(run_args)
        written = save(name, result, record=args.record)
        sys.stdout.write(f"== {name}\n{json.dumps(result, indent=2)}\n")
        sys.stdout.write("".join(f"wrote {path}\n" for path in written))
        met = met and bool(result.get("met", True))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
