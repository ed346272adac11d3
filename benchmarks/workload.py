"""The standard request traces (../shared/workloads/*.jsonl) over ../shared/data/war_of_the_worlds.txt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def result_path(given: Path | None, name: str) -> Path:
    """Where a benchmark writes its JSON: `--json` if given, else bench-results/NAME-DATE.json; the folder
    is made."""
    import datetime

    path = given or REPO_ROOT / "bench-results" / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


DEFAULT_TEXT = SHARED / "data" / "war_of_the_worlds.txt"
DEFAULT_CREATIVE_WRITING = SHARED / "workloads" / "creative_writing.jsonl"
DEFAULT_LONG_CONTEXT = SHARED / "workloads" / "long_context.jsonl"


@dataclass(slots=True)
class WorkloadRequest:
    """One line of a trace: the prompt text (already cut from the book) and its sampling settings."""

    id: str
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def load_workload(path: Path | str, text_path: Path | str) -> list[WorkloadRequest]:
    """Read a trace; `prompt_chars` = [start, end) code-point offsets into the text decoded as UTF-8."""
    path, text_path = Path(path), Path(text_path)
    if not path.is_file():
        raise FileNotFoundError(f"workload {path} not found (pass --workload PATH)")
    if not text_path.is_file():
        raise FileNotFoundError(f"text {text_path} not found (pass --text PATH)")
    text = text_path.read_text(encoding="utf-8")
    requests = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        start, end = row["prompt_chars"]
        if not 0 <= start < end <= len(text):
            raise ValueError(
                f"{path}:{n}: prompt_chars {row['prompt_chars']} outside the text ({len(text)} chars)"
            )
        requests.append(
            WorkloadRequest(
                id=str(row.get("id", f"line-{n}")),
                prompt=text[start:end],
                max_tokens=int(row["max_tokens"]),
                temperature=float(row.get("temperature", 1.0)),
                top_p=float(row.get("top_p", 1.0)),
                seed=row.get("seed"),
            )
        )
    if not requests:
        raise ValueError(f"workload {path} has no requests")
    return requests


def add_workload_arguments(group) -> None:
    """--workload and --text, the same for every benchmark that replays a trace."""
    group.add_argument(
        "--workload",
        type=Path,
        metavar="PATH",
        default=DEFAULT_CREATIVE_WRITING,
        help="request trace (JSONL)",
    )
    group.add_argument(
        "--text",
        type=Path,
        metavar="PATH",
        default=DEFAULT_TEXT,
        help="the text the trace's prompt_chars index",
    )
