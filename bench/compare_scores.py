"""Two trees' versioned results, value by value: reports/scores/*.json and reports/evidence.json.

The leaderboard is generated and not in git; these files are, so a commit's numbers can be compared with a fresh
run's. Every score key is compared except train_time_s (a machine figure); evidence.json is compared whole.

    python bench/compare_scores.py BEFORE_TREE AFTER_TREE      # e.g. the repo and a fresh clone after dvc repro
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MACHINE_KEYS = {"train_time_s"}


def compare(before: Path, after: Path) -> int:
    names = sorted(p.name for p in (before / "reports" / "scores").glob("*.json"))
    same, differ = 0, []
    for name in names:
        a = json.loads((before / "reports" / "scores" / name).read_text())
        b = json.loads((after / "reports" / "scores" / name).read_text())
        for key in sorted((set(a) | set(b)) - MACHINE_KEYS):
            if a.get(key) == b.get(key):
                same += 1
            else:
                differ.append(f"{name} {key}: {a.get(key)} → {b.get(key)}")
    ev_a = json.loads((before / "reports" / "evidence.json").read_text())
    ev_b = json.loads((after / "reports" / "evidence.json").read_text())
    ev_differ = [f"evidence {k}: {ev_a.get(k)} → {ev_b.get(k)}" for k in sorted(set(ev_a) | set(ev_b))
                 if ev_a.get(k) != ev_b.get(k)]
    for line in differ + ev_differ:
        print(line)
    print(f"{len(names)} experiments: {same} score values identical, {len(differ)} differ "
          f"({', '.join(sorted(MACHINE_KEYS))} left out); evidence.json: "
          f"{'identical' if not ev_differ else f'{len(ev_differ)} experiments differ'}")
    return 1 if differ or ev_differ else 0


if __name__ == "__main__":
    sys.exit(compare(Path(sys.argv[1]), Path(sys.argv[2])))
