"""Skip markers for tests that need hardware this machine may lack."""

import pytest
import torch

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU"
)
