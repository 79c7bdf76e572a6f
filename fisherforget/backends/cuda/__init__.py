"""CUDA backend: the hand-written kernels of ``csrc/`` in the compiled extension ``fisherforget._C``.

``ops`` registers the implementations (and the fake kernels that let ``torch.compile`` trace the
extension's ops); ``jit`` builds the same sources with ninja when no prebuilt ``_C`` imports.
"""

from fisherforget.backends.cuda.ops import (  # noqa: F401  (importing registers the ops)
    availability_error,
    build_kernels,
    build_info,
    fisher_accumulate,
    fisher_score,
    fused_step,
    host_only_error,
    library_source,
    load_library,
    load_prebuilt,
    supports_device,
)
