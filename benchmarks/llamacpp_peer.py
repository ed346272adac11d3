"""llama.cpp, the peer of `fitllm bench cpu`: where it is on this machine, and how to drive it.

Two builds from the same `llama-cpp-python` source distribution (outside CI, once per machine; the commands are
in BUILD_HELP and in the README's benchmark notes): the Python bindings in their own venv, driven through
`benchmarks/llamacpp_worker.py` in a subprocess (`LlamaCppWorker`), and `llama-server`, started per
concurrency with `-np N` slots (`LlamaServer`). Either may be absent: `find_*` then return None and the
benchmark prints BUILD_HELP instead of that side's figures.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.hf_baseline import RequestTiming
from benchmarks.serve_load import free_port, wait_healthy

DEFAULT_LLAMA_PYTHON = Path("/tmp/llamacpp/bin/python")
DEFAULT_LLAMA_SERVER_GLOB = (
    "/tmp/llama-server-build/llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-server"
)
WORKER = Path(__file__).with_name("llamacpp_worker.py")

BUILD_HELP = """\
build it once per machine (outside CI, ~6 + ~20 min on 2 cores; see README.md, "Benchmark notes"):
  bindings: python3.11 -m venv /tmp/llamacpp && CMAKE_ARGS=-DGGML_NATIVE=ON CMAKE_BUILD_PARALLEL_LEVEL=2 \\
            /tmp/llamacpp/bin/pip install llama-cpp-python                      (or pass --llama-python PATH)
  server:   mkdir -p /tmp/llama-server-build && cd /tmp/llama-server-build && \\
            pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz && \\
            cd llama_cpp_python-*/vendor/llama.cpp && \\
            cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF && \\
            cmake --build build --target llama-server -j2                        (or pass --llama-server PATH)"""


def find_llama_python(path: Path | None) -> tuple[Path | None, str]:
    """The Python that can import llama_cpp (None, and why not, when it cannot)."""
    python = path or DEFAULT_LLAMA_PYTHON
    if not python.is_file():
        return None, f"llama-cpp-python: no {python}"
    probe = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        return None, f"llama-cpp-python: {python} cannot import llama_cpp ({probe.stderr.strip()[-200:]})"
    return python, f"llama-cpp-python {probe.stdout.strip()} ({python})"


def find_llama_server(path: Path | None) -> tuple[Path | None, str]:
    """The llama-server binary (None, and why not, when there is none)."""
    if path is not None:
        return (path, f"llama-server {path}") if path.is_file() else (None, f"llama-server: no {path}")
    found = sorted(glob.glob(DEFAULT_LLAMA_SERVER_GLOB))
    if not found:
        return None, f"llama-server: nothing matches {DEFAULT_LLAMA_SERVER_GLOB}"
    return Path(found[-1]), f"llama-server {found[-1]}"


def peer_env() -> dict[str, str]:
    """The environment as the user gave it: without what fitllm set for its own OpenMP threads (a llama.cpp
    built with OpenMP would read it too), so each side runs with its own defaults."""
    from fitllm.openmp import SET_BY_FITLLM

    return {k: v for k, v in os.environ.items() if k not in SET_BY_FITLLM}


class LlamaCppWorker:
    """llama-cpp-python's high-level API in its own process: `generate` is one greedy completion from an empty
    cache, timed inside the worker (first token, end) so the pipe's latency is not counted."""

    name = "llama.cpp"

    def __init__(self, python: Path, model: Path, threads: int, n_ctx: int) -> None:
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), str(model), str(threads), str(n_ctx)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=peer_env(),
        )
        hello = self._read()
        self.version = hello.get("llama_cpp", "?")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited (code {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp worker: {reply['error']}")
        return reply

    def generate(self, prompt_ids: list[int], max_tokens: int) -> RequestTiming:
        self.proc.stdin.write(json.dumps({"op": "generate", "prompt": prompt_ids, "max_tokens": max_tokens}))
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        r = self._read()
        return RequestTiming(
            "llama.cpp", r["prompt_tokens"], r["output_tokens"], 0.0, r["ttft_s"], r["total_s"]
        )

    def peak_rss(self) -> int | None:
        return process_peak_rss(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def process_peak_rss(pid: int) -> int | None:
    """A live process's peak resident set (VmHWM, anonymous and file-backed pages alike), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class ServerProcess:
    """A server started for one load (fitllm serve or llama-server), its URL, and its peak RSS at the end.
    Its output goes to a temporary file (a pipe nobody reads would stall a chatty server)."""

    name: str
    cmd: list[str]
    port: int
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    log: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives until stop())
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_healthy(self.url, self.proc, name=self.name)
        except RuntimeError as exc:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"{exc}: {' '.join(self.cmd)}\n{self.log.read()[-2000:]}") from None
        return self

    def peak_rss(self) -> int | None:
        return process_peak_rss(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None


def llama_server(binary: Path, model: Path, threads: int, slots: int, ctx_per_slot: int) -> ServerProcess:
    """llama-server with `slots` parallel sequences (continuous batching) and `ctx_per_slot` tokens each."""
    port = free_port()
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-np", str(slots)]
    cmd += ["-c", str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess("llama-server", cmd, port, peer_env()).start()
