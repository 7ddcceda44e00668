"""sdxl-bench: quantized SDXL UNets (INT8/FP8) measured against FP16."""

import time as _time

IMPORTED_AT = _time.perf_counter()  # the earliest moment this program sees: its start-up table counts from here
