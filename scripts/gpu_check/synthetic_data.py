"""A stand-in for the novel and the creative-writing trace when neither was carried (same formats; the random
checkpoint's tokenizer maps every word to one id, so only word counts matter): WORK/text.txt, WORK/trace.jsonl.
DEVCHECK_TRACE_MAX_TOKENS caps each request's max_tokens (the CPU dry run's)."""

import json
import os
import random
import sys
from pathlib import Path

work = Path(sys.argv[1])
src = " ".join(p.read_text() for p in [*sorted(Path("docs").glob("*.md")), Path("README.md")])
text = (src + " ") * (420_000 // len(src) + 1)
(work / "text.txt").write_text(text[:420_000])
rng = random.Random(0)
cap = int(os.environ.get("DEVCHECK_TRACE_MAX_TOKENS", "0")) or None
with open(work / "trace.jsonl", "w") as f:
    for i in range(64):
        a = rng.randrange(0, 400_000)
        row = dict(
            id=f"cw-{i:02d}",
            prompt_chars=[a, a + rng.randint(700, 1100)],
            max_tokens=min(rng.randint(100, 198), cap or 198),
            temperature=round(rng.uniform(0.7, 0.9), 2),
            top_p=round(rng.uniform(0.85, 0.95), 2),
            seed=i,
        )
        f.write(json.dumps(row) + "\n")
