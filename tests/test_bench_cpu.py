"""`fitllm bench cpu`'s logic on a tiny model: the llama.cpp side absent (the message naming how to build it),
the rows it measures, the alternation, and the targets judged against a peer."""

from __future__ import annotations

import json

import pytest

from benchmarks.cpu import Plan, load_warning, measure_single_stream
from benchmarks.cpu_report import Row, judge
from benchmarks.hf_baseline import RequestTiming
from benchmarks.workload import DEFAULT_TEXT
from fitllm.cli import main as cli_main


def test_peer_absent_is_skipped_with_how_to_build(make_random_checkpoint, tmp_path, capsys):
    folder = make_random_checkpoint(tmp_path)
    out = tmp_path / "cpu.json"
    argv = [
        "bench",
        "cpu",
        "--quick",
        "--model",
        str(folder),
        "--dtype",
        "float32",
        "--parts",
        "decode,prefill",
    ]
    argv += ["--configs", "none,int8", "--new-tokens", "4", "--decode-prompt-tokens", "8"]
    argv += ["--prefill-tokens", "16,40", "--llama-server", str(tmp_path / "no-build" / "llama-server")]
    argv += ["--text", str(DEFAULT_TEXT), "--json", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp side skipped" in printed and str(tmp_path / "no-build") in printed
    assert "cmake --build build --target llama-server" in printed  # how to build it
    data = json.loads(out.read_text())
    assert data["threads"] == 2 and data["llama_cpp"] is None and len(data["skipped"]) == 1
    shape = [(r["part"], r["size"], r["system"]) for r in data["rows"]]
    assert shape == [
        ("decode", 4, "fitllm none"),
        ("decode", 4, "fitllm int8"),
        ("prefill", 16, "fitllm none"),
        ("prefill", 16, "fitllm int8"),
        ("prefill", 40, "fitllm none"),
        ("prefill", 40, "fitllm int8"),
    ]
    for r in data["rows"]:
        assert len(r["tok_per_s_samples"]) == (2 if r["part"] == "decode" else 1)  # --quick's rounds
        assert r["tok_per_s_median"] > 0 and r["ratio_vs_llama_cpp"] is None
    # int8 decode has a target (0.8x llama.cpp) that cannot be judged without the peer; none has no target
    verdicts = {(r["part"], r["system"]): r["verdict"] for r in data["rows"] if r["part"] == "decode"}
    assert verdicts == {("decode", "fitllm none"): "", ("decode", "fitllm int8"): "no peer"}


class FakeSystem:
    """A system whose requests take fixed times, recording the order it was called in."""

    def __init__(self, name: str, ttft: float, tpot: float, calls: list) -> None:
        self.name, self.ttft, self.tpot, self.calls = name, ttft, tpot, calls

    def generate(self, prompt_ids: list[int], max_tokens: int) -> RequestTiming:
        self.calls.append((self.name, len(prompt_ids), max_tokens))
        finish = self.ttft + self.tpot * (max_tokens - 1)
        return RequestTiming(self.name, len(prompt_ids), max_tokens, 0.0, self.ttft, finish)


def test_rounds_alternate_and_ratios_are_against_the_peer():
    calls: list = []
    systems = [
        FakeSystem("fitllm int4", ttft=0.5, tpot=0.010, calls=calls),
        FakeSystem("fitllm int8", ttft=2.0, tpot=0.020, calls=calls),
        FakeSystem("llama.cpp", ttft=1.0, tpot=0.0125, calls=calls),
    ]
    plan = Plan(["decode", "prefill"], [], [], 8, 2, [512, 100], 1, [], None)
    prompts = {"decode": [1] * 5, 512: [1] * 512, 100: [1] * 100}
    rows = judge(measure_single_stream(systems, prompts, plan))
    # each round runs every system once before the next round starts
    assert [c[0] for c in calls[:6]] == ["fitllm int4", "fitllm int8", "llama.cpp"] * 2
    assert calls[0] == ("fitllm int4", 5, 8) and calls[6] == ("fitllm int4", 512, 1)
    by = {(r.part, r.size, r.system): r for r in rows}
    int4, int8 = by["decode", 8, "fitllm int4"], by["decode", 8, "fitllm int8"]
    assert int4.tok_per_s == pytest.approx(100) and int4.ratio == pytest.approx(1.25)
    assert (int4.target, int4.verdict) == (1.0, "met")
    assert int8.ratio == pytest.approx(0.625) and (int8.target, int8.verdict) == (0.8, "not met")
    p512 = by["prefill", 512, "fitllm int4"]
    assert (
        p512.tok_per_s == pytest.approx(1024) and p512.ratio == pytest.approx(2.0) and p512.verdict == "met"
    )
    assert by["prefill", 512, "fitllm int8"].verdict == "not met"
    assert (
        by["prefill", 100, "fitllm int4"].target is None and by["prefill", 100, "fitllm int4"].verdict == ""
    )
    assert by["decode", 8, "llama.cpp"].ratio is None


def test_serve_target_needs_no_more_memory_than_llama_server():
    rows = [
        Row("serve", 8, "fitllm none", [300.0], peak_rss_bytes=900),
        Row("serve", 8, "fitllm int4", [300.0], peak_rss_bytes=400),
        Row("serve", 8, "llama-server", [100.0], peak_rss_bytes=500),
        Row("serve", 32, "fitllm none", [140.0], peak_rss_bytes=100),
        Row("serve", 32, "llama-server", [100.0], peak_rss_bytes=500),
    ]
    judge(rows)
    assert [(r.ratio, r.verdict) for r in rows if r.config] == [
        (3.0, "not met"),  # fast enough, but more memory
        (3.0, "met"),
        (1.4, "not met"),  # less memory, not fast enough
    ]


def test_serve_rows_show_the_memory_held_before_any_request():
    """The ready RSS (a server answering /health, no request yet) is read from /proc beside the peak and
    printed in its own column, so the fixed cost of a process is told apart from what the load added."""
    import io
    import os

    from rich.console import Console

    from benchmarks.cpu_report import render
    from benchmarks.llamacpp_peer import process_rss

    now, peak = process_rss(os.getpid(), "VmRSS"), process_rss(os.getpid())
    assert 0 < now <= peak
    rows = [
        Row(
            "serve",
            8,
            "fitllm int4",
            [300.0],
            peak_rss_bytes=600 << 20,
            ready_rss_bytes=430 << 20,
            rested_rss_bytes=512 << 20,
        )
    ]
    rows.append(Row("serve", 8, "llama-server", [100.0], peak_rss_bytes=390 << 20, ready_rss_bytes=330 << 20))
    out = io.StringIO()
    render(Console(file=out, width=300), judge(rows), [], [])
    lines = out.getvalue().splitlines()
    assert "ready RSS MiB" in "".join(lines)
    fitllm = next(line for line in lines if "fitllm int4" in line)
    assert "rested RSS MiB" in "".join(lines)
    assert "430" in fitllm and "600" in fitllm and "512" in fitllm and "not met" in fitllm
    assert rows[0].as_dict()["ready_rss_bytes"] == 430 << 20
    assert rows[0].as_dict()["rested_rss_bytes"] == 512 << 20


@pytest.mark.parametrize("entry", ["none", "int4"])
def test_each_serve_config_reaches_the_server_it_names(entry):
    # The default --quantization is auto (int4 on the default GGUF), so an entry left off the command
    # would serve something other than its row's name.
    from benchmarks.cpu import fitllm_serve_command
    from fitllm.args import engine_config_from_args
    from fitllm.cli import build_parser

    bench = build_parser().parse_args(
        ["bench", "cpu", "--ctx-per-slot", "512", "--fitllm-serve-args", "--max-num-batched-tokens 256"]
    )
    cmd = fitllm_serve_command(bench, entry, threads=2, slots=8, port=1234)
    serve = build_parser().parse_args(cmd[cmd.index("fitllm.cli") + 1 :])
    config = engine_config_from_args(serve)
    assert (config.quantization, config.max_num_seqs, config.max_model_len) == (entry, 8, 512)
    assert config.max_num_batched_tokens == 256  # --fitllm-serve-args reach the server


FAKE_LLAMA_SERVER = """#!{python}
# Stands in for llama-server: its flags, /health and /completion's `timings` (prompt 2 ms a token, 10 ms a
# generated token after the first), and the arguments it was started with, appended to {log}.
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

if "--version" in sys.argv:
    print("version: 9 (fake)")
    sys.exit(0)
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
port = int(sys.argv[sys.argv.index("--port") + 1])


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({{"status": "ok"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/completion" and body["cache_prompt"] is False and body["ignore_eos"] is True
        p, n = len(body["prompt"]), body["n_predict"]
        self._send({{"timings": {{"prompt_n": p, "prompt_ms": 2.0 * p, "predicted_n": n,
                                 "predicted_ms": 10.0 * (n - 1)}}}})


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_the_peer_is_llama_server_timed_by_its_own_timings(make_random_checkpoint, tmp_path, capsys):
    """decode/prefill against llama-server (a stand-in speaking its HTTP API): one slot, the flags given,
    its reported prompt_ms / predicted_ms turned into the same tok/s as fitllm's, and ratios judged."""
    import sys

    log = tmp_path / "argv.jsonl"
    binary = tmp_path / "llama-server"
    binary.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable, log=str(log)))
    binary.chmod(0o755)
    folder = make_random_checkpoint(tmp_path)
    out = tmp_path / "cpu.json"
    argv = ["bench", "cpu", "--quick", "--model", str(folder), "--dtype", "float32"]
    argv += [
        "--parts",
        "decode,prefill",
        "--configs",
        "none",
        "--new-tokens",
        "5",
        "--decode-prompt-tokens",
        "8",
    ]
    argv += [
        "--prefill-tokens",
        "40",
        "--llama-server",
        str(binary),
        "--llama-server-args",
        "--no-repack -fa off",
    ]
    argv += ["--text", str(DEFAULT_TEXT), "--json", str(out)]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["llama_cpp"].startswith("llama-server 9 (fake)") and data["skipped"] == []
    started = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(started) == 1  # one server for decode and prefill
    flags = started[0]
    assert flags[flags.index("-np") + 1] == "1" and flags[flags.index("-t") + 1] == "2"
    assert flags[-3:] == ["--no-repack", "-fa", "off"]
    assert int(flags[flags.index("-c") + 1]) >= 40
    rows = {(r["part"], r["system"]): r for r in data["rows"]}
    # 10 ms a token after the first: 100 tok/s; 40 prompt tokens in 80 ms: 500 tok/s.
    assert rows["decode", "llama.cpp"]["tok_per_s_samples"] == pytest.approx([100.0, 100.0])
    assert rows["prefill", "llama.cpp"]["tok_per_s_median"] == pytest.approx(500.0)
    fitllm = rows["decode", "fitllm none"]
    assert fitllm["ratio_vs_llama_cpp"] == pytest.approx(fitllm["tok_per_s_median"] / 100.0)


def test_a_busy_machine_is_named_in_the_report():
    """Ratios measured while other processes load the machine are flagged (llama.cpp's spinning threads lose
    far more to them than fitllm's)."""
    assert load_warning(1.9, 2) is None
    warning = load_warning(12.26, 2)
    assert "load average 12.3 on 2 CPUs" in warning and "quiet machine" in warning
    # A run's own threads are not other processes: 2 server threads and the client at the end of a serve run.
    from benchmarks.cpu import own_load

    assert own_load(2, ["serve"]) == 3 and own_load(2, ["decode", "prefill"]) == 2
