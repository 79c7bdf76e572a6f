"""Triton backend: the three ops on the multi-tensor Triton kernels of ``fisherforget.kernels``.

``ops`` registers the implementations and holds the host glue (buckets, contiguity, scalars on
the device); the kernels themselves live in the top-level ``kernels/`` folder, installed as
``fisherforget.kernels``. Runs on CUDA tensors, and on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set before the kernels are imported), which is how the tests run
without a GPU.
"""

from fisherforget.backends.triton.ops import (  # noqa: F401  (importing registers the ops)
    availability_error,
    fisher_accumulate,
    fisher_score,
    fused_step,
    host_only_error,
    load_kernels,
    supports_device,
)
