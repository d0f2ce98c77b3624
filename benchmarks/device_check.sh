#!/usr/bin/env bash
# One prepared GPU session (one H200, torch >= 2.11, triton >= 3.6) that always brings results back.
#
#   bash benchmarks/device_check.sh --prepare    # HERE, before the session: copy stories260K + 16 SFT rows from
#                                                # ../shared/data into the git-ignored .device/ (carry it)
#   bash benchmarks/device_check.sh              # on the device: run(command=..., carry=[".device"], timeout_s=600)
#   bash benchmarks/device_check.sh --dry-run    # anywhere: the CUDA steps are skipped, the plumbing is checked
#   ONLY="loop" LOOP_DEVICE=cpu bash benchmarks/device_check.sh    # only some steps (a rerun); the loop on CPU
#
# Steps, in order, each under its own `timeout` (their sum <= 480 s, checked before anything runs):
#   env        nvidia-smi, torch / triton versions; builds spin_fast/_C (C++ packing; without it: pure Python)
#   kernels    pytest -m cuda (the kernel tests at real shapes; "none collected" is recorded, not a failure)
#   bench_loss benchmarks.bench_loss --device cuda --dtype bfloat16
#   loop       one SPIN iteration on stories260K on CUDA: sampler (CUDA graph), reference cache, FSDP2 train with
#              bf16 MixedPrecisionPolicy on 1 GPU, save; summary.json copied to $OUT
#   sampler    benchmarks.bench_sampler --device cuda
# Each step appends one JSON line to $OUT/device_check.jsonl and one row to $OUT/device_check.md as soon as it
# ends (a step that fails or times out is recorded with its rc and log tail; the next step still runs: no set -e),
# and its full log goes to $OUT/logs/STEP.log; benchmark JSONs are copied to $OUT/results/ after their step.
# PYTHONPATH=. is all it needs (a plain checkout; no pip install). Exit status: 0 if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
unset TRITON_INTERPRET      # compiled kernels on the device (tests/conftest.py sets it only when there is no GPU)
OUT="${OUT:-/tmp/device_check_out}"
DEV=".device"
DRY=0
# step budgets (seconds); the whole run must fit a 600 s device call with room for start-up and copying
T_ENV=${T_ENV:-40} T_KERNELS=${T_KERNELS:-100} T_BENCH_LOSS=${T_BENCH_LOSS:-150} T_LOOP=${T_LOOP:-100}
T_SAMPLER=${T_SAMPLER:-85}
BUDGET=480

case "${1:-}" in
  --dry-run) DRY=1 ;;
  --prepare)
    SRC="../shared/data"
    [ -d "$SRC/models/stories260K" ] || { echo "no $SRC/models/stories260K here" >&2; exit 2; }
    mkdir -p "$DEV" && rm -rf "$DEV/stories260K" && cp -r "$SRC/models/stories260K" "$DEV/"
    head -n 16 "$SRC/sft/sft_ultrachat_schema-00000.jsonl" > "$DEV/sft16.jsonl"
    du -sh "$DEV"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --prepare]" >&2; exit 2 ;;
esac

mkdir -p "$OUT/logs" "$OUT/results"
JSONL="$OUT/device_check.jsonl" MD="$OUT/device_check.md"
[ -f "$MD" ] || printf '| step | status | rc | seconds | timeout_s |\n|---|---|---|---|---|\n' > "$MD"
FAILED=0

record() {  # record STEP STATUS RC SECONDS TIMEOUT [LOG]: one JSON line (with the log tail unless ok) + one row
  python3 - "$@" >> "$JSONL" <<'PY'
import json, sys, time
step, status, rc, secs, tmo = sys.argv[1:6]
row = {"step": step, "status": status, "rc": int(rc), "seconds": float(secs), "timeout_s": int(tmo),
       "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
if len(sys.argv) > 6 and status == "skipped":
    row["why"] = open(sys.argv[6]).read().strip()
elif len(sys.argv) > 6 and status != "ok":
    try:
        row["log_tail"] = open(sys.argv[6], errors="replace").read()[-3000:]
    except OSError as e:
        row["log_tail"] = f"(no log: {e})"
print(json.dumps(row), flush=True)
PY
  printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5" >> "$MD"
}

step() {  # step NAME TIMEOUT [--ok-rc N] CMD...: run CMD under timeout, log to $OUT/logs/NAME.log, record it
  local name=$1 tmo=$2; shift 2
  local okrc=-1
  if [ "${1:-}" = "--ok-rc" ]; then okrc=$2; shift 2; fi
  local log="$OUT/logs/$name.log" t0 rc status
  echo "== $name (timeout ${tmo}s) $(date -u +%T)"
  t0=$(date +%s%N)
  # bash -c: CMD may be one of the functions below (exported); timeout kills the whole step, children included
  timeout --kill-after=10 "$tmo" bash -c '"$@"' step "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) if [ "$rc" = "$okrc" ]; then status=ok; else status=failed; fi ;;
  esac
  [ "$status" = ok ] || FAILED=1
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  record "$name" "$status" "$rc" "$((ms / 1000)).$(( (ms % 1000) / 100 ))" "$tmo" "$log"
  tail -n 3 "$log"
}

skip() {  # skip NAME TIMEOUT WHY
  echo "== $1 skipped: $3"
  printf '%s\n' "$3" > "$OUT/logs/$1.log"
  record "$1" skipped 0 0 "$2" "$OUT/logs/$1.log"
}

want() {  # ONLY="loop sampler" runs just those steps (a rerun of what failed); the others are recorded as skipped
  [ -z "${ONLY:-}" ] && return 0
  case " $ONLY " in *" $1 "*) return 0 ;; esac
  skip "$1" "$2" "not in ONLY=$ONLY"; return 1
}

copy_results() {  # the benchmark JSONs written so far (a later failure cannot lose them)
  cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null || true
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
  python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  python3 -c "import triton; print('triton', triton.__version__)" || true
  python3 setup.py -q build_ext --inplace || echo "build_ext failed: packing uses its pure-Python collator"
  python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
}

kernel_tests() {  # rc 5 = no test collected (the cuda marker may not exist yet): recorded as such, not a failure
  python3 -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1
  local rc=$?
  [ $rc -eq 5 ] && echo "no test carries the cuda marker: none collected"
  return $rc
}

loop_iteration() {  # one SPIN iteration on CUDA; then the summary's decode / loss-kernel reports go to $OUT
  local work="$OUT/loop"
  rm -rf "$work"
  local model="$DEV/stories260K" rows="$DEV/sft16.jsonl"
  [ -d "$model" ] || { model="../shared/data/models/stories260K"; rows="$OUT/sft16.jsonl";
                       head -n 16 ../shared/data/sft/sft_ultrachat_schema-00000.jsonl > "$rows" || return 3; }
  [ -d "$model" ] || { echo "no stories260K: run 'bash benchmarks/device_check.sh --prepare' and carry .device"; return 3; }
  python3 -m spin_fast.train --model "$model" --data.sft "$rows" --output "$work" --device "${LOOP_DEVICE:-cuda}" \
      --data.chat_template "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}
{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}" \
      --loop.iterations 1 --loop.heldout 4 --generate.max_new_tokens 32 --max-length 192 --max-prompt-length 96 \
      --tokens-per-step 3072 --micro-batch-tokens 768 --lr 3e-4 --train.warmup_ratio 0 --train.progress false \
      --epochs 1 || return $?
  python3 - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
s = json.loads((work / "iter0" / "summary.json").read_text())
assert (work / "iter0" / "config.json").is_file(), "no saved HF model in iter0/"
keys = ("device", "compute_dtype", "world_size", "pairs", "generate", "loss_impl", "decode")
short = {k: s[k] for k in keys if k in s} | {"train_steps": s["train"]["steps"], "train_loss": s["train"]["final"].get("loss")}
print(json.dumps(short, default=str)[:4000])
PY
  local rc=$?
  cp "$work/iter0/summary.json" "$OUT/loop_summary.json" 2>/dev/null
  rm -rf "$work/iter0"/*.safetensors                # the weights need not travel back
  return $rc
}

export OUT DEV
export -f env_info kernel_tests loop_iteration

# --- the plan: check the budget before running anything -------------------------------------------------------------
TOTAL=$((T_ENV + T_KERNELS + T_BENCH_LOSS + T_LOOP + T_SAMPLER))
echo "device_check: $TOTAL s of step timeouts (budget $BUDGET s), results in $OUT"
if [ "$TOTAL" -gt "$BUDGET" ]; then
  echo "step timeouts sum to $TOTAL s > $BUDGET s" > "$OUT/logs/plan.log"
  record plan failed 1 0 "$BUDGET" "$OUT/logs/plan.log"; exit 1
fi
record plan ok 0 0 "$TOTAL"

if [ "$DRY" = 1 ]; then
  # the plumbing only: a step that fails must be recorded with its rc and log tail, and the run must go on
  step selftest_fail 5 bash -c 'echo "this step fails on purpose (dry run)"; exit 3'
  step selftest_ok 5 --ok-rc 5 bash -c 'echo fine; exit 5'
  step selftest_timeout 1 bash -c 'echo "this step outlives its timeout on purpose (dry run)"; sleep 30'
  python3 - "$JSONL" <<'PY' || { echo "dry run: the failure plumbing is broken" >&2; exit 1; }
import json, sys
rows = {r["step"]: r for r in map(json.loads, open(sys.argv[1]))}
assert rows["selftest_fail"]["status"] == "failed" and rows["selftest_fail"]["rc"] == 3
assert "fails on purpose" in rows["selftest_fail"]["log_tail"]
assert rows["selftest_ok"]["status"] == "ok" and rows["selftest_timeout"]["status"] == "timeout"
PY
  for s in "env:$T_ENV" "kernels:$T_KERNELS" "bench_loss:$T_BENCH_LOSS" "loop:$T_LOOP" "sampler:$T_SAMPLER"; do
    skip "${s%%:*}" "${s##*:}" "dry run: CUDA step not run"
  done
  echo "dry run done: $JSONL"
  exit 0
fi

want env "$T_ENV" && step env "$T_ENV" env_info
want kernels "$T_KERNELS" && step kernels "$T_KERNELS" --ok-rc 5 kernel_tests
want bench_loss "$T_BENCH_LOSS" &&
  step bench_loss "$T_BENCH_LOSS" python3 -m benchmarks.bench_loss --device cuda --dtype bfloat16 --repeats 3
copy_results
want loop "$T_LOOP" && step loop "$T_LOOP" loop_iteration
want sampler "$T_SAMPLER" &&
  step sampler "$T_SAMPLER" python3 -m benchmarks.bench_sampler --device cuda --batch-sizes 64 256 --repeats 2
copy_results
echo "device_check done (failed steps: $FAILED): $JSONL"
exit $FAILED
