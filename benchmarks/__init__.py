"""Benchmarks: scripts that print a table and write benchmarks/results/*.md (a regular package, so that tests
import these helpers even where another distribution installs a top-level ``benchmarks`` package, as opacus does)."""
