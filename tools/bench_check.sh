#!/usr/bin/env bash
# Device check of the benchmark plumbing (issue 7), on a GPU machine, from the project root:
#
#   bash .device/run.sh bash tools/bench_check.sh
#
# 0. warm:    the VM builds of every schedule, in parallel
# 1. base:    pytest on toy-4L and llama-3.2-1b-shape on the GPU, --benchmark-save=base
# 2. compare: the same run compared with it, --benchmark-compare-fail=median:5%   (must pass)
# 3. slowed:  the same with AMK_TEST_SLOWDOWN_US=200 (a GPU spin inside every timed region,
#             test only)                                       (must fail: each schedule a normal
#             failure with both numbers; no traceback; JUnit says failed)
# 4. bench:   python -m pytest_amk.cli bench on both files (baselines, table, roofline chart)
# Logs, JUnit, the saved benchmark JSON and the charts go to $OUT; a summary table is printed last.
# Budget: about 7 minutes on an H100 (the compile baseline is dropped if time runs short).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/amk-bench-check}"
mkdir -p "$OUT"
BUDGET="${BENCH_CHECK_BUDGET_S:-420}"
FILES=(schedules/toy-4L.toml schedules/llama-3.2-1b-shape.toml)
COMMON=(-p no:cacheprovider --amk-gpu=h100 --amk-device=cuda --amk-steps=2 -rfE)
# The project is on PYTHONPATH there, not installed: load the plugin by name unless its entry point is registered.
if ! python3 -c 'import importlib.metadata as m, sys; sys.exit(not any(e.name == "amk" for e in m.entry_points(group="pytest11")))'; then
  COMMON=(-p pytest_amk.plugin "${COMMON[@]}")
fi
SLOW_US=200

# matplotlib for the chart, from .device/plot/ when the machine lacks it.
if ! python3 -c "import matplotlib" 2>/dev/null && ls .device/plot/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/amk-plot .device/plot/*.whl \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/amk-plot"
fi

rm -rf .benchmarks
export COLUMNS=200  # pytest's short summary lines in full
declare -A RC SECS
left() { echo $((BUDGET - SECONDS)); }
step() {  # step NAME TIMEOUT_S CMD...: runs CMD (at most TIMEOUT_S, within the budget), log in $OUT/NAME.log
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  if [ "$limit" -gt "$(left)" ]; then limit=$(left); fi
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (the ${BUDGET} s budget is spent)" | tee "$OUT/$name.log"
    RC[$name]=skipped
    return
  fi
  echo "== $name: $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  echo "== $name: exit ${RC[$name]} after ${SECS[$name]} s" | tee -a "$OUT/$name.log"
  tail -n 4 "$OUT/$name.log"
}

# The VM builds of all four schedules, in parallel (nvcc is single-threaded; cached on disk).
WARM='
import concurrent.futures as cf, sys, time
import torch
from pytest_amk import pipeline
from pytest_amk.gpu.build import BuildConfig, build_cubin
from pytest_amk.schedule import parse_file
major, minor = torch.cuda.get_device_capability()
cfgs = sorted({BuildConfig.for_program(pipeline.lower_schedule(sf, s), f"sm_{major}{minor}")
               for sf in (parse_file(f, "h100") for f in sys.argv[1:]) for s in sf.schedules
               if s.expect.outcome != "rejected"}, key=repr)
t0 = time.time()
with cf.ThreadPoolExecutor(len(cfgs)) as ex:
    for cfg, built in zip(cfgs, ex.map(build_cubin, cfgs)):
        print(cfg, "cached" if built.cached else "built", built.report)
print(f"{len(cfgs)} builds in {time.time() - t0:.0f} s")
'
step warm 200 python3 -c "$WARM" "${FILES[@]}"
step base 240 python3 -m pytest "${FILES[@]}" "${COMMON[@]}" --junitxml="$OUT/base.xml" \
  --benchmark-save=base --benchmark-save-data
step compare 150 python3 -m pytest "${FILES[@]}" "${COMMON[@]}" --junitxml="$OUT/compare.xml" \
  --benchmark-compare=0001 --benchmark-compare-fail=median:5% --benchmark-save=head --benchmark-save-data
step slowed 150 env AMK_TEST_SLOWDOWN_US=$SLOW_US python3 -m pytest "${FILES[@]}" "${COMMON[@]}" \
  --junitxml="$OUT/slowed.xml" --benchmark-compare=0001 --benchmark-compare-fail=median:5% \
  --benchmark-save=slowed --benchmark-save-data
if [ "$(left)" -ge 200 ]; then  # leaves 75 s for a --no-compile run if compiling takes too long
  step bench $(($(left) - 75)) python3 -m pytest_amk.cli bench "${FILES[@]}" --chart "$OUT/roofline.png"
fi
if [ "${RC[bench]:-1}" != 0 ] && [ "$(left)" -ge 60 ]; then  # out of time (or compile broke): no compile
  step bench_nocompile "$(left)" python3 -m pytest_amk.cli bench "${FILES[@]}" --no-compile \
    --chart "$OUT/roofline.png"
fi
cp -r .benchmarks "$OUT/benchmarks" 2>/dev/null || true

for name in bench bench_nocompile; do
  if [ -f "$OUT/$name.log" ]; then
    echo
    echo "== amk bench ($name)"
    grep -v '^== ' "$OUT/$name.log" | tail -n 40
  fi
done

export OUT SLOW_US
export RC_BASE="${RC[base]}" RC_COMPARE="${RC[compare]}" RC_SLOWED="${RC[slowed]}"
export RC_BENCH="${RC[bench]:-skipped}" RC_BENCH_NC="${RC[bench_nocompile]:-}"
export SECS_ALL="$SECONDS"
python3 - <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, re
import xml.etree.ElementTree as ET

out = os.environ["OUT"]
def log(name):
    try:
        return open(f"{out}/{name}.log", errors="replace").read()
    except OSError:
        return ""
def junit(name):
    try:
        cases = list(ET.parse(f"{out}/{name}.xml").getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        return {}
    # Keyed by file and schedule: two files may both have a schedule named "default".
    return {f'{c.get("classname")}::{c.get("name")}': ("failed" if c.find("failure") is not None else
                            "error" if c.find("error") is not None else
                            "skipped" if c.find("skipped") is not None else "passed") for c in cases}
runs = {}
for path in glob.glob(".benchmarks/*/*/*.json"):
    tag = os.path.basename(path).split("_", 1)[1].removesuffix(".json")
    data = json.load(open(path))
    runs[tag] = {b["fullname"]: b for b in data["benchmarks"]}
    runs[tag + ":gpu"] = (data["machine_info"].get("amk", {}).get("gpu") or {})
    runs[tag + ":path"] = path
gpu = runs.get("base:gpu", {})
slow = log("slowed")
base_ok = junit("base")
n_timed = len(runs.get("base", {}))
regressions = len(re.findall(r"^benchmark regression \(", slow, re.M))
checks = [
    ("base run passes and saves", os.environ["RC_BASE"] == "0" and n_timed > 0,
     f"exit {os.environ['RC_BASE']}, {n_timed} benchmarks in {runs.get('base:path', '-')}"),
    ("storage per GPU model", "nvidia" in runs.get("base:path", "") or "h100" in runs.get("base:path", "").lower(),
     runs.get("base:path", "-").split("/")[1] if runs.get("base:path") else "-"),
    ("compare with median:5% passes", os.environ["RC_COMPARE"] == "0", f"exit {os.environ['RC_COMPARE']}"),
    (f"slowed +{os.environ['SLOW_US']} us caught", os.environ["RC_SLOWED"] == "1" and 0 < regressions == n_timed
     and list(junit("slowed").values()).count("failed") == n_timed,
     f"exit {os.environ['RC_SLOWED']}, {regressions}/{n_timed} regression failures, "
     f"junit {sorted(junit('slowed').items())}"),
    ("no traceback anywhere", not any(w in log(n) for n in ("base", "compare", "slowed")
                                      for w in ("Traceback", "PerformanceRegression", "INTERNALERROR")), ""),
    ("amk bench", os.environ["RC_BENCH"] == "0" or os.environ["RC_BENCH_NC"] == "0",
     f"exit {os.environ['RC_BENCH']}" + (f", --no-compile exit {os.environ['RC_BENCH_NC']}"
                                         if os.environ["RC_BENCH_NC"] else "")),
]
print()
print(f"== bench_check summary: {gpu.get('name', '?')}, {gpu.get('sm_count', '?')} SMs, driver "
      f"{gpu.get('driver', '?')}, CUDA {gpu.get('cuda_driver_api', '?')}, nvcc {gpu.get('nvcc', '?')}, "
      f"SM clock max {gpu.get('sm_clock_max_mhz', '?')} MHz; {os.environ['SECS_ALL']} s in all")
for what, ok, detail in checks:
    print(f"{'PASS' if ok else 'FAIL'}  {what:34s} {detail}")
print(f"\n{'schedule':40s} {'base us':>9s} {'again us':>9s} {'change':>7s} {'slowed us':>9s} "
      f"{'% roofline':>10s} {'% spec':>7s} {'floor us':>9s}")
for name, b in sorted(runs.get("base", {}).items()):
    med = b["stats"]["median"] * 1e6
    again = runs.get("head", {}).get(name, {}).get("stats", {}).get("median")
    slowed = runs.get("slowed", {}).get(name, {}).get("stats", {}).get("median")
    x = b["extra_info"]
    fmt = lambda v: f"{v * 1e6:9.1f}" if v else f"{'-':>9s}"
    change = f"{100 * (again * 1e6 / med - 1):+6.1f}%" if again else f"{'-':>7s}"
    print(f"{name.split('/')[-1]:40s} {med:9.1f} {fmt(again)} {change} {fmt(slowed)} "
          f"{x.get('pct_of_roofline') or 0:10.1f} {x.get('pct_of_spec') or 0:7.1f} {x.get('floor_us') or 0:9.1f}")
EOF
