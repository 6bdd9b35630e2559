"""Benchmarks: scripts that print a table and write benchmarks/results/*.md (a regular package, so that tests
import these helpers even where another distribution installs a top-level ``benchmarks`` package, as opacus does)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def publish(path: str | Path, lines: list[str]) -> None:
    """Write a result table (markdown lines) to ``path`` and print it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


def run_child(code: str, *args: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh Python process with ``args`` and return the JSON object its last stdout line holds
    (so each measurement, e.g. a peak RSS, starts from the same state); a failing child ends the benchmark with the
    tail of its stderr."""
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
                         env={**os.environ, **(env or {})})
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])
