#!/usr/bin/env bash
# One prepared GPU check (issue 13), under 8 minutes on one CUDA GPU:
#   1. the test suite's CUDA tests (the ones that skip on CPU: every test with "cuda" in its
#      name in tests/test_backends.py, tests/test_ops.py and tests/test_relative_keys.py, tests/test_key_positions.py), at most 240 s,
#      GPU_CHECK_WORKERS (default 4) pytest-xdist processes; the failing tests are listed in the JSON;
#   2. a short attention benchmark, at most 180 s: bswa's and fam's attention layouts
#      (block 1024, one memory block; fam with 16 extra rows per block), forward+backward,
#      T=32768, bf16, head dim 128, 16 heads, through `sdpa` (also without the NaN/inf
#      isolation: `sdpa+propagate`), `flex` and `xformers`, and
#      dense causal SDPA at the same T for the same run's reference FLOP/s.
# Writes one JSON file (first argument, default gpu_check.json). On a machine without CUDA
# it says so, writes {"cuda": false, ...} and exits 0.
#
#   bash benchmarks/gpu_check.sh /tmp/gpu_check.json
#
# FLOPs counted: 4·D per visible query-key pair (QKᵀ and PV) forward, x3.5 with the
# backward (the convention of bench_backends.py), summed over batch and heads.
# Environment (for a CPU smoke run of the benchmark code; not needed on a GPU):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_T=512 GPU_CHECK_DTYPE=float32 GPU_CHECK_BLOCK=64 GPU_CHECK_HEADS=2
set -u
OUT_JSON="${1:-gpu_check.json}"
case "$OUT_JSON" in /*) ;; *) OUT_JSON="$PWD/$OUT_JSON" ;; esac  # relative to the caller's directory, not the repo's
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

DEVICE="${GPU_CHECK_DEVICE:-}"
if [ -z "$DEVICE" ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False): nothing to check; exit 0"
    "$PY" - "$OUT_JSON" <<'EOF'
import json, sys
import torch
json.dump({"cuda": False, "torch": torch.__version__, "message": "no CUDA device: nothing checked"}, open(sys.argv[1], "w"), indent=2)
EOF
    exit 0
  fi
  DEVICE=cuda
fi

TESTS_RC=null
if [ "$DEVICE" = cuda ]; then
  echo "gpu_check: CUDA tests (at most 240 s; the whole log in ${OUT_JSON%.json}.tests.log)"
  # 4 pytest-xdist workers share the GPU: 84 s on an H200 against 217 s in one process
  timeout 240 "$PY" -m pytest tests/test_backends.py tests/test_ops.py tests/test_relative_keys.py tests/test_key_positions.py -q \
    -n "${GPU_CHECK_WORKERS:-4}" -k cuda -rfEs --tb=short --junitxml="$WORK/cuda_tests.xml" -p no:cacheprovider \
    > "${OUT_JSON%.json}.tests.log" 2>&1
  TESTS_RC=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "${OUT_JSON%.json}.tests.log" | cut -c1-300
fi

echo "gpu_check: attention benchmark on $DEVICE (at most 180 s)"
cat > "$WORK/bench.py" <<'EOF'
import json, os, sys, time
import torch
import torch.nn.functional as F
from memzoo import ops
from memzoo.ops import BlockLayout

device = os.environ.get("GPU_CHECK_DEVICE") or "cuda"
T = int(os.environ.get("GPU_CHECK_T", 32768))
L = int(os.environ.get("GPU_CHECK_BLOCK", 1024))
H = int(os.environ.get("GPU_CHECK_HEADS", 16))
dtype = getattr(torch, os.environ.get("GPU_CHECK_DTYPE", "bfloat16"))
D, B, FAM_ROWS, REPEATS = 128, 1, 16, 5


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    fn(); fn()  # warm-up (flex compiles here)
    times = []
    for _ in range(REPEATS):
        sync(); t = time.perf_counter(); fn(); sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def rnd(*shape):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


def pairs_of(layout, extra):
    q = torch.arange(T, device=device)
    block_start = q // L * L
    keys = torch.minimum(q - (block_start - layout.window).clamp(min=0) + 1, q + 1)
    return int(keys.sum()) + extra * T


results = {"device": device, "dtype": str(dtype), "T": T, "block_size": L, "heads": H, "head_dim": D, "batch": B,
           "torch": torch.__version__, "cases": {}}
if device == "cuda":
    results["gpu"] = torch.cuda.get_device_name()
q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)


def dense_step():
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()


dense_s = timed(dense_step)
dense_flops = 4 * D * B * H * (T * (T + 1) // 2) * 3.5
results["dense_causal_sdpa"] = {"seconds": dense_s, "flops_per_s": dense_flops / dense_s}
json.dump(results, open(sys.argv[1], "w"), indent=2)
nb = -(-T // L)
extra_k, extra_v = rnd(B, H, nb, FAM_ROWS, D), rnd(B, H, nb, FAM_ROWS, D)
for variant, extra in (("bswa", 0), ("fam", FAM_ROWS)):
    layout = BlockLayout(L, L)
    useful = 4 * D * B * H * pairs_of(layout, extra) * 3.5
    # sdpa also without the NaN/inf isolation (memzoo.ops.propagate_non_finite): on a GPU the
    # dispatcher runs it on every call (no host sync to skip it), eagerly too
    for backend, propagate in (("sdpa", False), ("sdpa", True), ("xformers", False), ("flex", False)):  # flex last: it compiles per shape
        label = f"{variant}/{backend}" + ("+propagate" if propagate else "")
        call = ops.AttentionCall(torch.device(device).type, dtype, layout, True, False, bool(extra), D, D)
        reasons = ops.get_backend(backend).not_supported_reasons(call)
        if reasons:
            results["cases"][label] = {"skipped": "; ".join(reasons)}
            continue
        rows = {"extra_k": extra_k, "extra_v": extra_v} if extra else {}

        def step():
            out = ops.attend(q, k, v, layout=layout, q_start=0, scale=D**-0.5, backend=backend, **rows)
            out.sum().backward()

        try:
            with ops.propagate_non_finite(propagate):
                s = timed(step)
        except Exception as exc:  # a kernel that fails here is a finding, not a crash of the check
            results["cases"][label] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        results["cases"][label] = {"seconds": s, "useful_flops_per_s": useful / s,
                                   "fraction_of_dense_causal": useful / s / results["dense_causal_sdpa"]["flops_per_s"]}
        q.grad = k.grad = v.grad = extra_k.grad = extra_v.grad = None
        json.dump(results, open(sys.argv[1], "w"), indent=2)  # after every case: a timeout keeps what ran
json.dump(results, open(sys.argv[1], "w"), indent=2)
print(json.dumps(results, indent=2))
EOF
timeout 180 "$PY" "$WORK/bench.py" "$WORK/bench.json"
BENCH_RC=$?

"$PY" - "$OUT_JSON" "$WORK" "$TESTS_RC" "$BENCH_RC" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, work, tests_rc, bench_rc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
report = {"cuda": os.environ.get("GPU_CHECK_DEVICE", "cuda") == "cuda", "bench_rc": bench_rc,
          "tests_rc": None if tests_rc == "null" else int(tests_rc)}
xml = os.path.join(work, "cuda_tests.xml")
if os.path.exists(xml):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    report["tests"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    report["tests"]["failed"] = [  # each failing test with the first line of its message
        {"test": case.get("name"), "message": (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""}
        for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")
    ]
bench = os.path.join(work, "bench.json")
report["bench"] = json.load(open(bench)) if os.path.exists(bench) else None
json.dump(report, open(out, "w"), indent=2)
print(f"gpu_check: wrote {out}")
EOF
