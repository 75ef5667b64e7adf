"""How the public `fq::` ops are defined: `torch.library.triton_op` where Triton is installed, so
that Inductor can inline the GPU kernels they launch; a plain `custom_op` otherwise (CPU-only
installs), where the reference implementation serves every device and Triton is never imported."""

from __future__ import annotations

import importlib.util

from torch.library import custom_op, triton_op

HAS_TRITON = importlib.util.find_spec("triton") is not None

define_op = triton_op if HAS_TRITON else custom_op
