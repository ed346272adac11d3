"""What the helpers share: the CUDA allocator's and the device's view of memory."""

import torch


def device_memory() -> dict:
    """Allocated and reserved bytes (PyTorch's allocator) and the device's used bytes; {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return dict(
        allocated=torch.cuda.memory_allocated(),
        reserved=torch.cuda.memory_reserved(),
        device_used=total - free,
    )
