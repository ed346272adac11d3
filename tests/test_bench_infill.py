"""`fitllm bench infill`'s logic on CPU: a tiny random code model (Qwen2.5-Coder's FIM tokens), a short file,
two keystrokes. The cache-on server serves every whole block the keystroke shares with the request before
from the cache; the cache-off one prefills it all; the JSON has the rows and the summary."""

from __future__ import annotations

import argparse
import json

from code_models import qwen_coder_checkpoint

from benchmarks import infill


def test_infill_benchmark_report(tmp_path, capsys):
    folder = qwen_coder_checkpoint(tmp_path)
    out = tmp_path / "infill.json"
    parser = argparse.ArgumentParser()
    infill.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(folder), "--prefix-chars", "300", "--suffix-chars", "40", "--keystrokes", "2",
         "--max-tokens", "2", "--out", str(out)]
    )  # fmt: skip
    assert infill.run(args) == 0
    report = json.loads(out.read_text())
    on, off = report["rows"]["cached"], report["rows"]["uncached"]
    assert [r["keystroke"] for r in on] == [r["keystroke"] for r in off] == [0, 1, 2]
    assert all(r["cached"] + r["prefilled"] == r["prompt_tokens"] for r in on + off)
    assert all(r["cached"] == 0 for r in off)
    # a keystroke adds one character (one byte-level token) at the cursor: the head before it is cached
    for before, after in zip(on, on[1:]):
        assert after["prompt_tokens"] == before["prompt_tokens"] + 1
        assert after["cached"] >= 256  # the extra file and ~300 characters of prefix, in whole blocks
    assert report["summary"]["median_keystroke_cached"] >= 256
    assert "keystroke / cold" in capsys.readouterr().out
