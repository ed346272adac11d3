"""Copy engines: how a streamed layer's bytes get from where they are kept into a staging buffer.

The WeightStreamer (fitllm/memory/offload/streamer.py) decides what to copy where and when; a copy engine only
moves bytes and says when they have arrived. Two tiers:

- `FileCopyEngine` (CPU): offloaded layers are kept in a file on disk and read into staging by one
  background thread with `os.preadv`, which releases the GIL and maps nothing, so the file's pages stay in
  the kernel's page cache (reclaimable) and never in the process's resident memory. The file is in
  `--offload-dir` (default: the temp folder, which TMPDIR chooses); a folder on tmpfs or ramfs would keep
  its bytes in RAM, so that is warned about.
- `StreamCopyEngine` (CUDA): offloaded layers are kept in pinned host memory (one exactly-sized page-locked
  arena, fitllm/memory/pinned.py) and copied into staging on a
  side stream; an event recorded after each copy is what compute waits on (only when the copy is late),
  and an event recorded after the layer has run is what the next copy into that buffer waits on. The
  stream operations are behind `StreamOps`, so the ordering logic is tested on CPU with a simulation.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.memory.pinned import CudaHostRegistrar, HostRegistrar, PinnedArena

log = logging.getLogger("fitllm")

# Filesystems whose files live in RAM: an offload file there takes the memory it was meant to free.
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class CopyEngine(Protocol):
    """Moves one packed layer into a staging buffer."""

    bytes_copied: int

    def start(self, layer: int, dst: torch.Tensor, after: Any) -> Any:
        """Begin copying `layer` into `dst` once `after` (a handle from `release`, or None) has passed;
        returns a handle `wait` takes."""
        ...

    def wait(self, handle: Any) -> None:
        """Make compute wait until the copy behind `handle` has landed."""
        ...

    def release(self) -> Any:
        """Called after a layer running from a staging buffer has been issued; returns what the next copy
        into that buffer must wait for."""
        ...

    def close(self) -> None: ...


class OffloadFile:
    """Packed layers in one file, layer slot k at k x layout.nbytes; written once at load, then read.

    Not the checkpoint itself: fitllm stores a layer fused (q/k/v, gate/up), quantized and repacked for
    its kernels, so the file holds layers as they run and a read is one contiguous copy."""

    def __init__(self, path: Path, layout: LayerLayout) -> None:
        self.path = path
        self.layout = layout
        self.slots: dict[int, int] = {}  # layer index -> slot in the file
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        # Unlinked at once: the bytes live as long as the descriptor, so no file outlives the process,
        # however it ends.
        path.unlink()
        self._scratch = torch.empty(layout.nbytes, dtype=torch.uint8)

    def write(self, index: int, layer: torch.nn.Module) -> None:
        """Pack `layer` and append it to the file."""
        self.layout.pack(layer, self._scratch)
        slot = self.slots.setdefault(index, len(self.slots))
        _pwrite_all(self._fd, memoryview(self._scratch.numpy()), slot * self.layout.nbytes)

    @property
    def nbytes(self) -> int:
        return len(self.slots) * self.layout.nbytes

    def finish(self) -> None:
        """Loading is over: drop the packing scratch."""
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        view = memoryview(dst.numpy())
        offset, done = self.slots[index] * self.layout.nbytes, 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{self.path}: short read of layer {index}")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class FileCopyEngine:
    """CPU tier: one background thread reads layers from the offload file into staging buffers."""

    def __init__(self, file: OffloadFile) -> None:
        self.file = file
        self.bytes_copied = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fitllm-offload")

    def start(self, layer: int, dst: torch.Tensor, after: Any) -> Future:
        # CPU compute is synchronous: when the streamer starts a copy into a buffer, the layer that ran
        # from it has finished, so `after` is always already passed.
        return self._pool.submit(self._read, layer, dst)

    def _read(self, layer: int, dst: torch.Tensor) -> None:
        self.file.read_into(layer, dst)
        with self._lock:
            self.bytes_copied += dst.numel()

    def wait(self, handle: Future) -> None:
        handle.result()  # re-raises a failed read here, on the engine thread

    def release(self) -> None:
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.file.close()


class StreamOps(Protocol):
    """The three stream operations the CUDA tier needs (simulated on CPU in the tests)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """On the side stream: wait for `after` (None: nothing), copy src into dst, return an event."""
        ...

    def wait(self, event: Any) -> None:
        """The compute stream waits for `event` (the host does not)."""
        ...

    def record(self) -> Any:
        """An event on the compute stream, after everything issued so far."""
        ...


class CudaStreamOps:
    """StreamOps on a real CUDA side stream."""

    def __init__(self, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        with torch.cuda.stream(self.side):
            if after is not None:
                self.side.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        return event

    def wait(self, event: Any) -> None:
        torch.cuda.current_stream(self.side.device).wait_event(event)

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.side.device))
        return event


class PinnedHostStore:
    """Packed layers in page-locked host memory, for the CUDA tier: one `PinnedArena` of exactly the
    offloaded layers' bytes (not the caching host allocator, which would round it up to a power of two)."""

    def __init__(self, layout: LayerLayout, num_layers: int, registrar: HostRegistrar | None) -> None:
        self.layout = layout
        self.arena = PinnedArena(PinnedArena.bytes_for(num_layers, layout.nbytes), registrar)
        self.layers: dict[int, torch.Tensor] = {}

    def write(self, index: int, layer: torch.nn.Module) -> None:
        out = self.arena.take(self.layout.nbytes)
        self.layout.pack(layer, out)
        self.layers[index] = out

    def finish(self) -> None:
        pass


def make_sink(
    layout: LayerLayout, num_layers: int, device: torch.device, offload_dir: str | None
) -> OffloadFile | PinnedHostStore:
    """Where offloaded layers are kept: pinned host memory for a CUDA device, a file for the CPU (whose
    'device' memory is host memory already, so only a file takes the bytes out of the budget)."""
    if device.type == "cuda":
        return PinnedHostStore(layout, num_layers, CudaHostRegistrar())
    folder = Path(offload_dir) if offload_dir else Path(tempfile.gettempdir())
    if not folder.is_dir():
        raise ValueError(f"--offload-dir {folder}: no such folder")
    fs_type = mount_fs_type(folder, _read_mounts())
    if fs_type in RAM_FILESYSTEMS:
        log.warning(
            "the offload file goes to %s, which is on %s: its bytes stay in RAM, so offloading saves no "
            "memory; choose a folder on disk with --offload-dir%s",
            folder,
            fs_type,
            "" if offload_dir else " (or the TMPDIR environment variable)",
        )
    fd, name = tempfile.mkstemp(prefix="fitllm-offload-", suffix=".bin", dir=folder)
    os.close(fd)
    return OffloadFile(Path(name), layout)


def _read_mounts() -> str | None:
    """The mount table (Linux); None where there is none to read."""
    try:
        return Path("/proc/mounts").read_text()
    except OSError:
        return None


def _unescape_mount_path(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_fs_type(folder: str | os.PathLike, mounts: str | None) -> str | None:
    """The filesystem type of the mount that holds `folder` (symlinks resolved), from the text of a
    /proc/mounts table: the longest mount point containing it, the last mounted where several share
    one. None without a table or a match."""
    if not mounts:
        return None
    path = os.path.realpath(folder)
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount_path(fields[1])
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return None if best is None else best[1]


def make_copy_engine(sink: OffloadFile | PinnedHostStore, device: torch.device) -> CopyEngine:
    if isinstance(sink, OffloadFile):
        return FileCopyEngine(sink)
    return StreamCopyEngine(sink.layers, CudaStreamOps(device), sink.arena)


class StreamCopyEngine:
    """CUDA tier: layers kept packed in pinned host memory, copied into staging on a side stream."""

    def __init__(
        self, host: dict[int, torch.Tensor], ops: StreamOps, arena: PinnedArena | None = None
    ) -> None:
        self.host = host  # layer index -> packed bytes (pinned on CUDA)
        self.ops = ops
        self.arena = arena  # the page-locked memory behind `host`: kept (and registered) until close
        self.bytes_copied = 0

    def start(self, layer: int, dst: torch.Tensor, after: Any) -> Any:
        self.bytes_copied += dst.numel()
        return self.ops.copy(dst, self.host[layer], after)

    def wait(self, handle: Any) -> None:
        self.ops.wait(handle)

    def release(self) -> Any:
        return self.ops.record()

    def close(self) -> None:
        self.host.clear()
        if self.arena is not None:
            self.arena.close()
