"""The project's own bug battery: plausible bugs, each applied alone to a copy of the code, that the quality
tests (`pytest -m quality` on `tiny`) must fail on. `python -m tests.battery` (or `nox -s battery`) runs it;
`bugs.py` lists the bugs, `harness.py` copies, patches and runs. Nothing in sdxl_core knows about it."""
