"""The long fuzz: `python -m tests.fuzz` (or `make fuzz`).

Starts the real `gateway run` with a Redis of its own, as the bounded run of `make test` does,
and runs schemathesis with every check and every phase (examples, coverage, fuzzing, stateful
sequences) once per key: admin, send, and none. Unlike the bounded run it is random (the seed is
printed: pass it back with --seed to replay a run) and much larger. Everything it writes stays in
--workdir (default .fuzz/, ignored by git): schemathesis' output and JUnit/NDJSON reports per
pass, the gateway's log, and schemathesis' crash cache, which replays earlier failures first.
Exit status 0 only when every pass found nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from tests.fuzz.runner import ALL_PHASES, Budget, run_st
from tests.fuzz.stack import running_gateway

KEYS = ("admin", "send", "none")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument(
        "--max-examples", type=int, default=1000, help="cases per operation and phase (1000)"
    )
    parser.add_argument(
        "--max-time",
        type=int,
        default=None,
        help="seconds per pass; fuzzing and stateful phases repeat until it is spent",
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument(
        "--keys", default=",".join(KEYS), help=f"passes to run, of {','.join(KEYS)} (all)"
    )
    parser.add_argument("--phases", default=ALL_PHASES, help=f"schemathesis phases ({ALL_PHASES})")
    parser.add_argument("--workdir", type=Path, default=Path(".fuzz"), help="output (.fuzz)")
    args = parser.parse_args(argv)

    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        parser.error(f"unknown --keys {', '.join(unknown)}: choose from {', '.join(KEYS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    budget = Budget(args.max_examples, args.phases, seed, args.max_time)
    workdir = args.workdir.resolve() / time.strftime("%Y%m%dT%H%M%S")
    print(f"fuzz seed {seed}; output in {workdir}", flush=True)

    failed: list[str] = []
    with running_gateway(workdir) as target:
        secrets = {"admin": target.admin_key, "send": target.send_key, "none": None}
        for name in keys:
            print(f"\n== pass: {name} key", flush=True)
            # The crash cache is shared by runs, so each replays earlier failures first.
            outcome = run_st(
                target,
                secrets[name],
                budget,
                workdir / f"st-{name}",
                cache_dir=workdir.parent,
                echo=True,
            )
            if not outcome.passed:
                failed.append(name)
    summary = f"failed passes: {', '.join(failed)}" if failed else "every pass passed"
    print(f"\nfuzz seed {seed}: {summary}; output in {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
