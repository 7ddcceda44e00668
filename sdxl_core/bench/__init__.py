"""GPU measurements a user runs by name (`sdxl-bench engines | kernels | profile`, or their nox sessions).

Each writes one compact JSON result file into `--out DIR` and rewrites it after every measured row, so a run
killed by a time limit still leaves what it measured; `sdxl-bench report FILE` renders any of them as
markdown. They run on an offline GPU host whose Python already has CUDA torch (no venv, no downloads), and
on the CPU with `--model tiny` (what the CI smoke tests do).
"""
