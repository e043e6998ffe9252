"""The benchmarks and the quality harness, run from the repository root as modules (`python -m bench.run`,
`python -m bench.eval`; `make bench`, `make eval`)."""
