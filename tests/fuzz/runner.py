"""`st run` (schemathesis' CLI) against a running gateway, with this project's settings.

The CLI rather than the pytest plugin: it runs every phase (the document's examples, the
coverage phase's boundary and hostile values, random fuzzing, stateful sequences following the
document's links) with every check, and its report says how to reproduce each failure.
Settings that hold for every run are in schemathesis.toml beside this file, with the reason for
each; what changes between the bounded run and the long fuzz is passed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.stack import META_APP_SECRET, Target

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "schemathesis.toml"
HOOKS = HERE / "hooks.py"
ALL_PHASES = "examples,coverage,fuzzing,stateful"
# Checks that `--checks all` would run and that do not apply to this API, each with the reason:
# - use_after_free: it expects a GET after a successful DELETE to answer 404. Both DELETEs here
#   are soft by contract (API.md): a deleted number stays readable with `status: deleted` (its
#   queued messages end `failed` with that reason), a canceled message stays readable with
#   `status: canceled` for the retention period. A 200 there is the documented answer.
NOT_APPLICABLE_CHECKS = ("use_after_free",)


@dataclass(frozen=True)
class Budget:
    """How much to generate. `seed=None` means derandomized: the same cases on every run."""

    max_examples: int
    phases: str = ALL_PHASES
    seed: int | None = None
    max_time_s: int | None = None
    max_failures: int | None = None


@dataclass(frozen=True)
class Outcome:
    returncode: int
    output: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0


def st_binary() -> str:
    """The `st` script installed next to this interpreter."""
    path = Path(sys.executable).parent / "st"
    assert path.exists(), f"schemathesis is not installed at {path}: pip install -e '.[dev]'"
    return str(path)


def st_args(target: Target, key: str | None, budget: Budget, workdir: Path) -> list[str]:
    args = [
        st_binary(),
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        target.schema_url,
        "--checks",
        "all",
        "--exclude-checks",
        ",".join(NOT_APPLICABLE_CHECKS),
        # Every distinct failure of an operation, not only its first one.
        "--continue-on-failure",
        "--phases",
        budget.phases,
        "--max-examples",
        str(budget.max_examples),
        "--report",
        "junit,ndjson",
        "--report-dir",
        str(workdir / "report"),
    ]
    if budget.seed is None:
        args.append("--generation-deterministic")
    else:
        args += ["--seed", str(budget.seed)]
    if budget.max_time_s is not None:
        args += ["--max-time", str(budget.max_time_s)]
    if budget.max_failures is not None:
        args += ["--max-failures", str(budget.max_failures)]
    if key is not None:
        args += ["--header", f"Authorization: Bearer {key}"]
    return args


def run_st(
    target: Target,
    key: str | None,
    budget: Budget,
    workdir: Path,
    *,
    cache_dir: Path | None = None,
    echo: bool = False,
) -> Outcome:
    """Run `st run`; output in workdir/st-<n>.log (echoed when asked), reports in workdir/report.

    Schemathesis keeps a crash cache (.schemathesis/) in its working directory, `cache_dir`, and
    replays it first on the next run: by default that is `workdir`, fresh for each bounded run,
    so that run depends on nothing left over.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(HOOKS),
        "GATEWAY_WEBHOOK_SECRET": target.webhook_secret,
        "GATEWAY_META_APP_SECRET": META_APP_SECRET,
    }
    log_path = workdir / f"st-{len(list(workdir.glob('st-*.log')))}.log"
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            st_args(target, key, budget, workdir),
            cwd=cache_dir or workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
        returncode = process.wait()
    return Outcome(returncode, log_path.read_text())
