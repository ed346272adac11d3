"""Page-locked (pinned) host memory, counted as the bytes it really takes.

PyTorch's caching host allocator (`torch.empty(..., pin_memory=True)`) rounds every block up to the next
power of two before asking CUDA for it, so a 1.1 GiB offload store would hold 2 GiB of page-locked memory
(up to ~1.8x what fitllm planned). Two remedies, by lifetime:

- Long-lived, sized up front (the offload store: every offloaded layer, written once at load):
  `PinnedArena` takes one ordinary host allocation of exactly the bytes and page-locks it with
  `cudaHostRegister`, then hands out views. It holds the registration until it is closed.
- Short-lived, sized per use (swap buffers of preempted requests): registering pages costs milliseconds per
  call, which is why the caching allocator exists; those keep it, and the books count what it really
  holds (`pinned_block_bytes`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

PAGE_BYTES = 4096
VIEW_ALIGN = 256  # bytes: each view starts where a 16-byte vector copy of any dtype is aligned


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A short-lived host buffer that device copies read and write: from the caching host allocator, pinned
    when `pin` (a CUDA device), so a copy runs without a bounce through pageable memory and may be
    asynchronous. It holds `pinned_block_bytes` of its size."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def pinned_tensor(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, PinnedArena]:
    """A long-lived host tensor of exactly its bytes, page-locked when `pin` (a CUDA device), and the arena
    that holds its registration (keep it as long as the tensor)."""
    nbytes = math.prod(shape) * dtype.itemsize
    arena = PinnedArena(nbytes, CudaHostRegistrar() if pin else None)
    return arena.take(nbytes).view(dtype).view(shape), arena


def pinned_block_bytes(nbytes: int) -> int:
    """What the caching host allocator holds for a pinned request of `nbytes` (the next power of two)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


class HostRegistrar(Protocol):
    """Page-locks ranges of host memory for the device (CUDA's cudaHostRegister); a stand-in on CPU."""

    def register(self, ptr: int, nbytes: int) -> None: ...

    def unregister(self, ptr: int) -> None: ...


class CudaHostRegistrar:
    """cudaHostRegister / cudaHostUnregister through PyTorch's CUDA runtime bindings."""

    def register(self, ptr: int, nbytes: int) -> None:
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (CUDA error {int(err)})")

    def unregister(self, ptr: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(ptr)


class PinnedArena:
    """One host allocation of exactly `nbytes` (plus page alignment), page-locked once, carved into views.

    The arena owns the registration: views must not outlive it (the offload store keeps both for the
    engine's life). With no registrar the memory is ordinary pageable memory (CPU stand-in, tests)."""

    def __init__(self, nbytes: int, registrar: HostRegistrar | None) -> None:
        self.nbytes = nbytes
        self._base = torch.empty(nbytes + PAGE_BYTES, dtype=torch.uint8)
        start = -self._base.data_ptr() % PAGE_BYTES
        self.memory = self._base[start : start + nbytes]
        self.registrar = registrar
        self._used = 0
        if registrar is not None and nbytes > 0:
            registrar.register(self.memory.data_ptr(), nbytes)
        else:
            self.registrar = None

    @property
    def used_bytes(self) -> int:
        return self._used

    def take(self, nbytes: int) -> torch.Tensor:
        """The next `nbytes` of the arena as a uint8 view (aligned to VIEW_ALIGN)."""
        start = -(-self._used // VIEW_ALIGN) * VIEW_ALIGN
        if start + nbytes > self.nbytes:
            raise MemoryError(
                f"pinned arena of {self.nbytes} bytes has {self.nbytes - start} left; {nbytes} asked"
            )
        self._used = start + nbytes
        return self.memory[start : start + nbytes]

    def close(self) -> None:
        """Undo the page-locking (idempotent)."""
        if self.registrar is not None:
            registrar, self.registrar = self.registrar, None
            registrar.unregister(self.memory.data_ptr())

    def __del__(self) -> None:
        self.close()

    @staticmethod
    def bytes_for(num_views: int, view_bytes: int) -> int:
        """Arena size that holds `num_views` views of `view_bytes` each, aligned as `take` aligns them."""
        return num_views * (-(-view_bytes // VIEW_ALIGN) * VIEW_ALIGN)
