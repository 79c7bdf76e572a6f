"""Triton kernels of fisherforget (installed as ``fisherforget.kernels``).

Three multi-tensor kernels, each covering a whole bucket of tensors (same device and dtypes) in
one launch through device-resident address tables (``multi_tensor``):

- ``fused_step``: the Fisher-AdamW step (math: ``fisherforget.ops``), one pass over the data
  (``step_rows`` reads a bucket's address table and says whether it is regular enough for it);
- ``fisher_accumulate``: ``F = alpha*F + beta*(g/grad_scale)^2``;
- ``fisher_score``: ``[<d, g>, sum F*g^2]``, float64, deterministic two-stage reduction.

These launchers expect validated, contiguous input; ``fisherforget.backends.triton`` is the
checked entry point that the op contract dispatches to. See ``NOTES.md`` for the design.
"""

from .fisher import fisher_accumulate, fisher_score
from .step import fused_step, step_rows
from .multi_tensor import LaunchConfig, interpreting, launch_config

__all__ = [
    "fused_step",
    "step_rows",
    "fisher_accumulate",
    "fisher_score",
    "LaunchConfig",
    "launch_config",
    "interpreting",
]
