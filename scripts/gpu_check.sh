#!/usr/bin/env bash
# fitllm on an NVIDIA GPU (H100/H200): the GPU tests and the key figures as one bounded run (issue 23). From
# the repository root:
#     bash scripts/gpu_check.sh          (or: OUT=/some/dir BUDGET_S=530 STEPS="tests micro" bash scripts/gpu_check.sh)
# Python: one that already has CUDA torch + triton + transformers (the GPU machine's own python3, or $PYTHON);
# only if there is none does it run `bash scripts/setup.sh --dev` (which needs a package index).
# fitllm and benchmarks run from the checkout (PYTHONPATH); nothing is installed into the image.
# Optional inputs: .gpu/war_of_the_worlds.txt and .gpu/creative_writing.jsonl (else shared/ or ../shared/, else a
# synthetic stand-in: scripts/gpu_check/synthetic_data.py); .whl/*.whl (installed --no-index to a temp dir).
# Steps, most important first, each under its own time limit and all under BUDGET_S (default 530 s, so the
# whole run stays under 9 minutes on an H100):
#   tests   - pytest tests/test_cuda_path.py tests/test_cuda_graphs.py  ||  tests/test_triton_*.py (native)
#   micro   - kernel microbenchmarks (scripts/gpu_check/microbench.py): decode attention with the alignment
#             hint vs without, the split rule vs the old one, int8 KV, prefill vs SDPA, int8/int4 weight-only
#             matmuls vs bf16 cuBLAS, small kernels inside a CUDA graph
#   roof1b  - batch-1 decode vs the bandwidth roofline, Llama-3.2-1B shape, bf16/int8, graphs/eager/async off,
#             + transformers; the graph pool measured vs planned; the ledger vs the allocator
#   roof8b  - the same, Llama-3.1-8B shape, bf16 and int8 with graphs
#   tput1b  - `fitllm bench throughput` at 64 concurrent vs transformers (docs/benchmarks.md runbook command)
#   mem1b   - `fitllm bench memory` static vs elastic KV + device-allocator peaks and slab release
#             (scripts/gpu_check/memwrap.py)
# Output ($OUT, default ./devcheck-out): summary.txt (read this first), results.jsonl (one JSON object per
# measurement), tests.log, bench.log (all bench stdout/stderr), env.txt.
#
# CPU dry run (checks this script and its helpers, no figures; tests/test_gpu_check.py runs it in CI):
#   DEVCHECK_DEVICE=cpu DEVCHECK_SMALL=tiny DEVCHECK_BIG=tiny DEVCHECK_TESTS_A=tests/test_cuda_check.py DEVCHECK_TESTS_B=tests/test_cuda_check.py \
#   DEVCHECK_ROOF_EXTRA="--prompt-tokens 16 --decode-tokens 4" DEVCHECK_TPUT_EXTRA="--num-requests 2 --max-tokens-cap 4" \
#   DEVCHECK_MEM_EXTRA="--num-requests 2 --concurrency 2 --timing-rounds 1 --max-model-len 512" \
#   DEVCHECK_TRACE_MAX_TOKENS=4 TRITON_INTERPRET=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh
# (DEVCHECK_TRACE_MAX_TOKENS: use the synthetic trace, each request capped at that many new tokens.)
set -uo pipefail
START=$(date +%s)
BUDGET_S=${BUDGET_S:-530}
DEADLINE=$((START + BUDGET_S))
OUT=${OUT:-$PWD/devcheck-out}
WORK=${WORK:-/tmp/fitllm-devcheck}
HELP=$PWD/scripts/gpu_check
STEPS=${STEPS:-"env tests micro roof1b roof8b tput1b mem1b"}
mkdir -p "$OUT" "$WORK"
SUM=$OUT/summary.txt RES=$OUT/results.jsonl TLOG=$OUT/tests.log BLOG=$OUT/bench.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
DEV=${DEVCHECK_DEVICE:-cuda} SMALL=${DEVCHECK_SMALL:-1b} BIG=${DEVCHECK_BIG:-8b}
ROOF_EXTRA=${DEVCHECK_ROOF_EXTRA:-} TPUT_EXTRA=${DEVCHECK_TPUT_EXTRA:-} MEM_EXTRA=${DEVCHECK_MEM_EXTRA:-}
[[ -f pyproject.toml && -d fitllm && -d scripts/gpu_check ]] || { echo "run from the fitllm repository root" >&2; exit 2; }
# The pytest selections of the tests step (the dry run names a small CPU one).
TESTS_A=${DEVCHECK_TESTS_A:-tests/test_cuda_path.py tests/test_cuda_graphs.py}
TESTS_B=${DEVCHECK_TESTS_B:-tests/test_triton_attention.py tests/test_triton_matmul.py tests/test_triton_engine.py}

# ---- driver -------------------------------------------------------------------------------------------------
left() { echo $((DEADLINE - $(date +%s))); }
note() { echo "$*" | tee -a "$SUM"; }
want() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
limit() { # planned min -> seconds to give, or empty if not enough left
  local l; l=$(left); local t=$(( $1 < l - 8 ? $1 : l - 8 ))
  (( t >= $2 )) && echo "$t"
}
jsonline() { # step json_file : append one compact line (per-request arrays dropped) to results.jsonl
  "$PY" "$HELP/jsonline.py" "$1" "$2" >> "$RES" 2>>"$BLOG"
}
bench() { # name planned min cmd... : run with a time limit, output to bench.log
  local name=$1 planned=$2 min=$3; shift 3
  want "$name" || return 0
  local t; t=$(limit "$planned" "$min") || true
  if [[ -z "$t" ]]; then note "[$name] SKIPPED: $(left)s left, needs ${min}s"; return 0; fi
  local t0; t0=$(date +%s)
  note "[$name] start, limit ${t}s, at +$((t0 - START))s"
  echo "===== [$name] $* =====" >> "$BLOG"
  timeout -k 10 -s INT "$t" "$@" >> "$BLOG" 2>&1
  local rc=$?
  note "[$name] rc=$rc in $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' TIMED OUT')"
  return 0
}

# ---- 0. environment ----------------------------------------------------------------------------------------
note "fitllm device check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET_S}s, steps: $STEPS"
{ nvidia-smi 2>&1 | head -20; uname -a; nproc; free -g; df -h /tmp | tail -1; } > "$OUT/env.txt" 2>&1
pick_python() {
  local c
  for c in ${PYTHON:-} python3 .venv/bin/python; do
    if "$c" -c "import torch, triton, transformers, safetensors, tokenizers; assert torch.cuda.is_available() or '$DEV' == 'cpu'" >/dev/null 2>&1; then
      PY=$c; return 0
    fi
  done
  return 1
}
if ! pick_python; then
  note "no Python here with CUDA torch + triton + transformers; trying the project's setup: bash scripts/setup.sh --dev"
  timeout 900 bash scripts/setup.sh --dev >> "$OUT/env.txt" 2>&1 || note "setup.sh failed (rc=$?)"
  if ! pick_python; then
    note "FATAL: no CUDA-enabled torch. .venv has: $(.venv/bin/python -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -1)"
    exit 1
  fi
fi
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels for packages the machine lacks (none needed for these steps)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl >> "$OUT/env.txt" 2>&1 \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$HELP${PYTHONPATH:+:$PYTHONPATH}"   # fitllm, benchmarks and the helpers from the checkout
"$PY" - >> "$OUT/env.txt" 2>&1 <<'PYEOF'
import sys, torch, triton, transformers
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers", transformers.__version__)
print("gpu", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1)) if p else print("gpu none (CPU dry run)")
for m in ("fitllm.engine.engine", "fitllm.model.attention.triton_kernels", "fitllm.quant.triton_matmul", "benchmarks.roofline",
          "benchmarks.throughput", "benchmarks.memory", "xdist", "bitsandbytes", "gguf"):
    try:
        __import__(m); print("import ok:", m)
    except Exception as e:
        print("import FAILED:", m, repr(e)[:200])
PYEOF
note "$(grep -E '^(torch|gpu|python)' "$OUT/env.txt" | tr '\n' ';')"
grep "import FAILED" "$OUT/env.txt" | tee -a "$SUM"

# data for the throughput and memory benches: the novel and the creative-writing trace
TEXT=""; WL=""
[[ -n "${DEVCHECK_TRACE_MAX_TOKENS:-}" ]] || for d in .gpu shared/data ../shared/data; do [[ -f $d/war_of_the_worlds.txt ]] && { TEXT=$d/war_of_the_worlds.txt; break; }; done
[[ -n "${DEVCHECK_TRACE_MAX_TOKENS:-}" ]] || for d in .gpu shared/workloads ../shared/workloads; do [[ -f $d/creative_writing.jsonl ]] && { WL=$d/creative_writing.jsonl; break; }; done
if [[ -z "$TEXT" || -z "$WL" ]]; then
  note "the novel / trace were not carried (.gpu/ or shared/): using a synthetic stand-in (same format; the random checkpoint's tokenizer maps every word to one id, so only word counts matter)"
  "$PY" "$HELP/synthetic_data.py" "$WORK"
  TEXT=$WORK/text.txt; WL=$WORK/trace.jsonl
fi
C1=/tmp/fitllm-roofline/llama-$SMALL-bfloat16

# ---- 1. correctness on the GPU: the CUDA-path tests and the Triton kernel tests, side by side ---------------
if want tests; then
  t=$(limit 130 40) || true
  if [[ -n "$t" ]]; then
    note "[tests] start, limit ${t}s, at +$(( $(date +%s) - START ))s"
    t0=$(date +%s)
    XD1=""; XD2=""; "$PY" -c "import xdist" 2>/dev/null && { XD1="-n 4"; XD2="-n 8"; }  # pytest-xdist: compiles in parallel
    PT=("$PY" -m pytest -o addopts= -q -p no:cacheprovider -p no:warnings -rfE --durations=8)
    timeout -k 10 -s INT "$t" "${PT[@]}" $XD1 $TESTS_A > "$WORK/t_cuda.log" 2>&1 &
    p1=$!
    timeout -k 10 -s INT "$t" "${PT[@]}" $XD2 $TESTS_B > "$WORK/t_triton.log" 2>&1 &
    p2=$!
    wait $p1; r1=$?; wait $p2; r2=$?
    { echo "===== $TESTS_A $XD1 (rc=$r1) ====="; cat "$WORK/t_cuda.log";
      echo "===== $TESTS_B $XD2 (rc=$r2) ====="; cat "$WORK/t_triton.log"; } > "$TLOG"
    note "[tests] rc first=$r1 second=$r2 in $(( $(date +%s) - t0 ))s: $(grep -hE '(passed|failed|error).* in [0-9.]+s' "$WORK/t_cuda.log" "$WORK/t_triton.log" | tr '\n' ' ')"
  else
    note "[tests] SKIPPED: $(left)s left"
  fi
fi

# ---- 2. kernel microbenchmarks (attention with the alignment hint vs without; int8/int4 vs bf16) -------------
bench micro 75 20 "$PY" "$HELP/microbench.py" --out "$RES" --work "$WORK" $( [[ $DEV == cpu ]] && echo --smoke )

# ---- 3. batch-1 decode vs the bandwidth roofline, 1B (bf16 and int8; graphs on/off) and transformers ---------
bench roof1b 130 60 "$PY" "$HELP/roofline_compact.py" --size "$SMALL" --variants none:graphs:on,none:eager:on,int8:graphs:on,none:graphs:off --hf --out "$RES" $ROOF_EXTRA

# ---- 4. the same for 8B (bf16 and int8 with graphs; the bench's eager/async-off rows and transformers left out) -
bench roof8b 170 90 "$PY" "$HELP/roofline_compact.py" --size "$BIG" --variants none:graphs:on,int8:graphs:on --out "$RES" $ROOF_EXTRA

# ---- 5. throughput at 64 concurrent vs transformers, 1B (the runbook's command) ---------------------------
if want tput1b && [[ ! -f $C1/tokenizer.json ]]; then "$PY" "$HELP/fastckpt.py" --size "$SMALL" >> "$BLOG" 2>&1; fi
bench tput1b 110 50 "$PY" -m fitllm.cli --log-level INFO bench throughput --model "$C1" --device "$DEV" --dtype bfloat16 \
  --text "$TEXT" --workload "$WL" --concurrency 64 --json "$WORK/tp-1b.json" $TPUT_EXTRA
want tput1b && jsonline throughput-1b "$WORK/tp-1b.json"

# ---- 6. peak memory, static vs elastic KV pool, 1B (the runbook's command, plus the device's own figures) -----
bench mem1b 100 45 "$PY" "$HELP/memwrap.py" "$WORK/mem-1b-device.json" --log-level INFO bench memory --model "$C1" --device "$DEV" \
  --dtype bfloat16 --text "$TEXT" --workload "$WL" --json "$WORK/mem-1b.json" $MEM_EXTRA
if want mem1b; then jsonline memory-1b "$WORK/mem-1b.json"; jsonline memory_device-1b "$WORK/mem-1b-device.json"; fi

# ---- summary -------------------------------------------------------------------------------------------------
grep -hE "CUDA graphs:|CUDA graph capture failed|decode runs eagerly|workspace: measured|Traceback|Error" "$BLOG" 2>/dev/null | sort | uniq -c | sort -rn | head -20 > "$WORK/notable.txt"
{ echo; echo "==== summary (+$(( $(date +%s) - START ))s) ===="; "$PY" "$HELP/summarize.py" "$OUT"; echo "-- notable log lines (count):"; cat "$WORK/notable.txt"; } | tee -a "$SUM"
