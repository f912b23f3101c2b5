#!/usr/bin/env python3
"""Rebuild OUT/summary.json from what `benchmarks/gpu_check.sh` has finished so far (called after every step).

    python benchmarks/gpu_check_report.py OUT WORK

WORK holds the step records (`steps.tsv`: name, status, rc, seconds, reason — one line per finished step) and each
pytest step's JUnit XML (`junit_<step>.xml`); OUT holds the logs, `throughput.jsonl` and `epoch_profile.json`. The
summary is written to a temporary file beside it and renamed, so a kill at any moment leaves the previous complete
summary. Standard library only (it must run before anything is installed).
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_steps(work: Path) -> list[dict]:
    steps = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, rc, seconds, reason = (line.split("\t") + [""] * 5)[:5]
        steps.append({"step": name, "status": status, "rc": int(rc), "seconds": int(seconds), "reason": reason})
    return steps


def read_junit(path: Path) -> dict:
    """Counts and one entry per test that did not pass (name, outcome, first line of the message)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        return {"error": f"unreadable junit: {err}"}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    not_passed = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag == "failure" else tag
                msg = (node.get("message") or node.text or "").strip().splitlines()
                not_passed.append({"test": name, "outcome": outcome, "message": (msg[0] if msg else "")[:300]})
                break
        counts[outcome] += 1
    return {"counts": counts, "not_passed": not_passed}


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append({"unparsed": line[:300]})  # a line cut by a kill
    return rows


def main(argv: list[str]) -> int:
    out, work = Path(argv[1]), Path(argv[2])
    steps = read_steps(work)
    for step in steps:
        junit = work / f"junit_{step['step']}.xml"
        if junit.exists():
            step["tests"] = read_junit(junit)
    bench = read_jsonl(out / "throughput.jsonl")
    profile = read_jsonl(out / "epoch_profile.json")  # one record (benchmarks/epoch_profile.py --json)
    env = (out / "env.txt").read_text(errors="replace") if (out / "env.txt").exists() else ""
    plan = json.loads((work / "plan.json").read_text()) if (work / "plan.json").exists() else {}
    summary = {
        "plan": plan,
        "steps": steps,
        "all_ok": bool(steps) and all(s["status"] in ("ok", "skipped") for s in steps),
        "throughput_rows": [r for r in bench if r.get("kind") == "row"],
        "throughput_sections": [r for r in bench if r.get("kind") == "section"],
        "epoch_profile": profile[-1] if profile else None,
        "env": env,
    }
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
