"""One compact JSON line (per-request arrays dropped) from a bench's JSON file, tagged with its step:
`python jsonline.py STEP FILE >> results.jsonl`. A missing or broken file gives a `step_error` line."""

import json
import sys


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in ("requests", "timings")}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


step, path = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        data = json.load(f)
except Exception as e:
    print(json.dumps(dict(kind="step_error", step=step, error=f"no JSON: {e!r}")))
    raise SystemExit from None
data = strip(data)
data.setdefault("kind", step.split("-")[0])
data["step"] = step
print(json.dumps(data))
