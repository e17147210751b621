"""Reading callgrind's dumps for `bench redis-instructions`."""

from __future__ import annotations

from pathlib import Path

from bench.redis_instructions import totals_of


def test_each_dump_gives_its_total_in_the_order_the_dumps_were_made(tmp_path: Path) -> None:
    for serial, total in ((1, 300), (2, 5000), (10, 7)):
        (tmp_path / f"callgrind.out.{serial}").write_text(
            f"version: 1\ncreator: callgrind-3.19.0\nsummary: 0\ntotals: {total}\n"
        )
    files = [str(p) for p in tmp_path.iterdir()]
    assert totals_of(files) == [300, 5000, 7]
