"""Benchmark runs leave the work tree clean: figures are recorded into tracked files on purpose."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import stack

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    results, recorded = tmp_path / "bench" / "results", tmp_path / "bench" / "recorded"
    monkeypatch.setattr(stack, "RESULTS", results)
    monkeypatch.setattr(stack, "RECORDED", recorded)
    monkeypatch.setattr(stack, "machine", lambda: {"cpus": 2})
    return results, recorded


def test_a_run_writes_only_to_the_results_directory(dirs: tuple[Path, Path]) -> None:
    results, recorded = dirs
    written = bench_main.save("drain", {"ratio": 0.8})
    assert {p.parent for p in written} == {results}
    latest = json.loads((results / "drain-latest.json").read_text())
    assert latest["result"] == {"ratio": 0.8}
    assert not recorded.exists()


def test_record_copies_the_json_and_the_plots_it_names(dirs: tuple[Path, Path]) -> None:
    results, recorded = dirs
    results.mkdir(parents=True)
    (results / "accuracy-1-workers-15ms.png").write_bytes(b"png")
    plot = "bench/results/accuracy-1-workers-15ms.png"  # as accuracy.py names it
    bench_main.save(
        "accuracy", {"runs": [{"plot": plot}], "note": "bench/results/none.png"}, record=True
    )
    kept = json.loads((recorded / "accuracy-latest.json").read_text())
    assert kept["result"]["runs"][0]["plot"] == "bench/recorded/accuracy-1-workers-15ms.png"
    assert kept["result"]["note"] == "bench/results/none.png"  # no such file: left alone
    assert (recorded / "accuracy-1-workers-15ms.png").read_bytes() == b"png"
    assert len(list(recorded.glob("accuracy-2*.json"))) == 1
    scratch = json.loads((results / "accuracy-latest.json").read_text())
    assert scratch["result"]["runs"][0]["plot"] == plot


def test_git_ignores_results_and_tracks_recorded() -> None:
    def ignored(path: str) -> bool:
        check = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
        return check.returncode == 0

    in_git = subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True, check=False)
    if in_git.returncode != 0:
        pytest.skip("not a git work tree")
    assert stack.RESULTS == REPO / "bench" / "results"
    assert ignored("bench/results/drain-latest.json")
    assert ignored("bench/results/accuracy-1-workers-15ms.png")
    assert not ignored("bench/recorded/drain-latest.json")
