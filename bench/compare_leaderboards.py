"""Compare two leaderboard.csv files (before and after a change), every metric column bit for bit.

A refactor must not change a result: every column that a run's numbers decide has to hold the same text in
both files (the CSV carries each float's repr, so equal text is an equal float). Columns that measure this
machine rather than the model (wall time, throughput, latency, memory, MFU, the MLflow run id) may differ and
are listed apart.

    python bench/compare_leaderboards.py BEFORE/reports/leaderboard.csv AFTER/reports/leaderboard.csv

Exit status 0 when every metric column matches, 1 when one differs (each difference is printed).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

# Columns measured on the machine, not decided by the run's numbers.
MACHINE_COLUMNS = re.compile(r"(time|_per_s$|latency|memory|mfu|peak_flops|mlflow_run_id)")


def read(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {row["experiment"]: row for row in csv.DictReader(f)}


def compare(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> tuple[list[str], set[str]]:
    """The differing metric cells (one line each) and the machine columns left out."""
    problems = [f"{name}: only in the first file" for name in sorted(before.keys() - after.keys())]
    problems += [f"{name}: only in the second file" for name in sorted(after.keys() - before.keys())]
    skipped: set[str] = set()
    for name in sorted(before.keys() & after.keys()):
        a, b = before[name], after[name]
        for column in sorted(a.keys() | b.keys()):
            if MACHINE_COLUMNS.search(column):
                skipped.add(column)
            elif a.get(column) != b.get(column):
                problems.append(f"{name}: {column}: {a.get(column)!r} → {b.get(column)!r}")
    return problems, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = read(args.before), read(args.after)
    problems, skipped = compare(before, after)
    columns = len(next(iter(before.values()), {}))
    print(f"{len(before)} experiments, {columns} columns; {columns - len(skipped)} metric columns compared, "
          f"{len(skipped)} machine columns left out: {', '.join(sorted(skipped))}")
    for line in problems:
        print(f"DIFFERS {line}")
    print("every metric column is identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
