"""fisherforget: a Fisher-aware AdamW with fused kernels, for graceful forgetting in language models.

``FisherAdamW`` is a drop-in ``torch.optim.Optimizer``; :mod:`fisherforget.ops` declares the ops its
backends implement; :mod:`fisherforget.backends` picks one.
"""

from fisherforget.optim import FisherAdamW

__version__ = "0.1.0"
__all__ = ["FisherAdamW", "__version__"]
