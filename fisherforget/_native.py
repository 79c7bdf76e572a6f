"""The compiled extension's host helpers (``fisherforget._C``: ``layout_key``, ``address_rows``),
or None where it is not built or predates them; the callers then take their Python paths."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

_RESOLVED: list = []  # [the module or None], resolved on first use


def helpers() -> Optional[ModuleType]:
    if not _RESOLVED:
        try:
            import fisherforget._C as native
        except ImportError:
            native = None
        _RESOLVED.append(native if hasattr(native, "address_rows") else None)
    return _RESOLVED[0]
