"""`fitllm bench cpu`'s logic on a tiny model: the llama.cpp side absent (the message naming how to build it),
the rows it measures, the alternation, and the targets judged against a peer."""

from __future__ import annotations

import json

import pytest

from benchmarks.cpu import Plan, measure_single_stream
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
