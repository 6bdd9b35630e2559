"""Benchmarks: scripts that print a table and write benchmarks/results/*.md (a regular package, so that tests
import these helpers even where another distribution installs a top-level ``benchmarks`` package, as opacus does)."""

from pathlib import Path


def publish(path: str | Path, lines: list[str]) -> None:
    """Write a result table (markdown lines) to ``path`` and print it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))
