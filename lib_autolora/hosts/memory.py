"""Device memory readings the adapters put into the stats and the strategy choice (CUDA only;
None where unknown)."""
from __future__ import annotations

from typing import Optional

import torch


def peak_bytes() -> Optional[int]:
    if torch.cuda.is_available():
        try:
            return int(torch.cuda.max_memory_allocated())
        except RuntimeError:
            return None
    return None


def free_bytes() -> Optional[int]:
    if torch.cuda.is_available():
        try:
            return int(torch.cuda.mem_get_info()[0])
        except RuntimeError:
            return None
    return None
