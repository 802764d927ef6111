"""The benchmark scripts: one question each, results beside them in `results/`. Run them from the repository root as
`python benchmarks/NAME.py` (the project installs this package, so the scripts import each other and `harness` by
their package names); `harness` holds what they share."""
