"""The suite's options, markers, hooks and session fixtures are a pytest plugin, `sdxl_core/suite/plugin.py`
(loaded by `-p` in pyproject.toml and by the package's `pytest11` entry point), so that an installed
sdxl-bench brings them to any checkout; this file only marks the repository root for pytest."""
