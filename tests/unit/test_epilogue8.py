"""The epilogue our attention, LayerNorm and GEGLU kernels share (`kernels.epilogue8`): what a call costs besides
its kernel. Their arithmetic is checked per kernel (tests/unit/test_attention8.py, test_layernorm8.py,
test_geglu_act8.py)."""

import pytest

from tests.support.tiny import run_in_interpreter


@pytest.mark.slow
def test_a_producer_kernel_call_allocates_its_outputs_and_fills_nothing():
    proc = run_in_interpreter("producer_fills_check.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK 12 calls" in proc.stdout
