"""llama.cpp, the peer of `fitllm bench cpu`: where it is on this machine, and how to drive it.

One build, `llama-server` from the vendored llama.cpp of the `llama-cpp-python` source distribution (outside CI,
once per machine; the commands are in BUILD_HELP and the README's benchmark notes), driven over HTTP for every
part: one slot (`-np 1`) for batch-1 decode and prefill, timed by llama.cpp itself (the `timings` of its
`/completion` answer: `prompt_ms`, `predicted_ms`, which is how llama.cpp reports its own speed), and `-np N`
slots for the concurrent workload. Where it is absent `find_llama_server` returns None and the benchmark prints
BUILD_HELP instead of that side's figures.

(The Python bindings are not used: on this machine class their libllama crashed on the first completion, and so
did llama-server, both in ggml's AMX matmul (`ldtilecfg`, SIGSEGV). The server's `--no-repack` keeps weights
in the plain CPU buffer, so the AVX-512/VNNI kernels run; it is in DEFAULT_SERVER_ARGS and `--llama-server-args`
replaces it where AMX works.)
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.hf_baseline import RequestTiming
from benchmarks.serve_load import free_port, wait_healthy

DEFAULT_LLAMA_SERVER_GLOB = "/tmp/llama-server-build/*/vendor/llama.cpp/build/bin/llama-server"
DEFAULT_SERVER_ARGS = "--no-repack"

BUILD_HELP = """\
build it once per machine (outside CI, ~15-20 min on 2 cores; see README.md, "Benchmark notes"):
  mkdir -p /tmp/llama-server-build && cd /tmp/llama-server-build && \\
  pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz && \\
  cd llama_cpp_python-*/vendor/llama.cpp && \\
  cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF && \\
  nice -n 19 cmake --build build --target llama-server -j2                  (or pass --llama-server PATH)"""


def find_llama_server(path: Path | None) -> tuple[Path | None, str]:
    """The llama-server binary and its version line (None, and why not, when there is none)."""
    if path is None:
        found = sorted(glob.glob(DEFAULT_LLAMA_SERVER_GLOB))
        if not found:
            return None, f"llama-server: nothing matches {DEFAULT_LLAMA_SERVER_GLOB}"
        path = Path(found[-1])
    if not path.is_file():
        return None, f"llama-server: no {path}"
    try:
        probe = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"llama-server: {path} does not run ({exc})"
    version = next((ln for ln in (probe.stdout + probe.stderr).splitlines() if ln.startswith("version")), "")
    return path, f"llama-server {version.removeprefix('version: ') or '?'} ({path})"


def peer_env() -> dict[str, str]:
    """The environment as the user gave it: without what fitllm set for its own OpenMP threads (llama.cpp is
    built with OpenMP and would read it too), so each side runs with its own defaults."""
    from fitllm.openmp import SET_BY_FITLLM

    return {k: v for k, v in os.environ.items() if k not in SET_BY_FITLLM}


class LlamaCppSide:
    """llama-server with one slot as a `generate(prompt_ids, max_tokens) -> RequestTiming` system: one greedy
    completion at a time from an empty cache (`cache_prompt: false`), EOS ignored, timed by llama.cpp itself
    (prompt_ms = its time to the first token, predicted_ms = the rest), so HTTP and JSON are not counted."""

    name = "llama.cpp"

    def __init__(self, binary: Path, model: Path, threads: int, n_ctx: int, extra_args: str) -> None:
        self.server = llama_server(binary, model, threads, 1, n_ctx, extra_args)

    def generate(self, prompt_ids: list[int], max_tokens: int) -> RequestTiming:
        body = {
            "prompt": prompt_ids,
            "n_predict": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "cache_prompt": False,
        }
        req = urllib.request.Request(
            f"{self.server.url}/completion",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=1800) as r:
            t = json.loads(r.read())["timings"]
        if t["prompt_n"] != len(prompt_ids):  # a cached prefix would make this no longer a whole prefill
            raise RuntimeError(f"llama-server evaluated {t['prompt_n']} of {len(prompt_ids)} prompt tokens")
        ttft = t["prompt_ms"] / 1e3
        return RequestTiming(
            "llama.cpp", len(prompt_ids), t["predicted_n"], 0.0, ttft, ttft + t["predicted_ms"] / 1e3
        )

    def peak_rss(self) -> int | None:
        return self.server.peak_rss()

    def close(self) -> None:
        self.server.stop()


def process_rss(pid: int, key: str = "VmHWM") -> int | None:
    """A live process's resident set from /proc (VmHWM: its peak; VmRSS: now; anonymous and file-backed
    pages alike), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
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
        return process_rss(self.proc.pid)

    def rss(self) -> int | None:
        return process_rss(self.proc.pid, "VmRSS")

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


def llama_server(
    binary: Path,
    model: Path,
    threads: int,
    slots: int,
    ctx_per_slot: int,
    extra_args: str = DEFAULT_SERVER_ARGS,
) -> ServerProcess:
    """llama-server with `slots` parallel sequences (continuous batching) and `ctx_per_slot` tokens each."""
    port = free_port()
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-np", str(slots)]
    cmd += ["-c", str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port), *extra_args.split()]
    return ServerProcess("llama-server", cmd, port, peer_env()).start()
