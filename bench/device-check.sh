#!/usr/bin/env bash
# One-shot check of this project on a CUDA machine, results in one JSON. Every step has its own time limit: steps
# 1-4 are sized to finish in under 8 minutes together (step 4's compiled step, new, may take 4 more); step 5
# (new, not yet run on a GPU) is limited to 7.
#
#   bash bench/device-check.sh [OUT_DIR]        # default OUT_DIR: artifacts/device-check
#
# It expects a CUDA build of torch already installed (the README's first command, with the CUDA build) and then
# runs the README's second one, `pip install -e ".[dev]"`. On a machine without network access, set WHEELS to a
# folder of wheels for the missing packages: they and the project are then installed with --no-deps, offline.
# GSM8K (train.jsonl/test.jsonl) and GPT-2's tokenizer (gpt2.tiktoken) are read from SHARED_DATA (default
# ../shared/data): the model is GPT-2 small's shape with random weights (no hub access is assumed), so the run
# measures speed and the CUDA code paths, not GPT-2's features.
#
# MAX_DOCS (documents per split, default 2000), DEVICE (default cuda), BENCH_DOCS and BENCH_TOKENS size the run.
#
# Steps, each under its own time limit so one hang cannot eat the rest:
#   1. environment: GPU, torch, CUDA; NCCL with one process (init, all_reduce, barrier)
#   2. tests/test_cuda.py: CUDA against CPU (extraction, pinned loader, fp16 autocast + GradScaler, evaluation)
#   3. pipeline bench on the GPT-2-small-shaped model and the real GSM8K test split (every figure, the store's
#      read and write speed against np.fromfile and tofile, the splice's efficiency and each stage's start-up
#      included)
#   4. a short full run (extract, train A/B/C, evaluate, analyze, report) on MAX_DOCS documents per split, timed
#      per stage; then figure 8d, a config-C-sized step of relu and topk with train.torch_compile against eager
#      (`bench_compiled_step`): what decides whether it should be on by default on CUDA
#   5. the ground-truth benchmark at the published scale, shortened: params-synth-16k.yaml (16,384 features in
#      768 dimensions, five SAEs of 4,096 latents, L0 25) on SYNTH_SAMPLES streamed samples (default 10M of the
#      recipe's 200M), its report (our rows beside the published ones) kept in OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=$(mkdir -p "${1:-artifacts/device-check}" && cd "${1:-artifacts/device-check}" && pwd)
SHARED_DATA=$(cd "${SHARED_DATA:-../shared/data}" && pwd) || { echo "error: SHARED_DATA not found" >&2; exit 2; }
MAX_DOCS=${MAX_DOCS:-2000}
DEVICE=${DEVICE:-cuda}
BENCH_DOCS=${BENCH_DOCS:-400}
BENCH_TOKENS=${BENCH_TOKENS:-1048576}
SYNTH_SAMPLES=${SYNTH_SAMPLES:-10000000}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

step() {  # step NAME LIMIT_S COMMAND...: run, time, keep the log and exit code
  local name=$1 limit=$2; shift 2
  local start=$(date +%s%N)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  tail -n 25 "$OUT_DIR/$name.log"
  printf '{"rc": %d, "seconds": %d.%03d}\n' "$rc" $((ms / 1000)) $((ms % 1000)) > "$WORK/$name.step.json"
  echo "== $name: rc=$rc, $((ms / 1000)).$((ms % 1000)) s"
}

if [[ -n "${WHEELS:-}" ]]; then
  step install 120 bash -c "$python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $WHEELS/*.whl \
    && $python -m pip install -q --no-index --no-deps --no-build-isolation -e ."
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  step install 600 "$python" -m pip install -q -e ".[dev]"
fi

step environment 120 "$python" - "$WORK/environment.json" <<'PY'
import json, os, socket, sys, time
import torch, torch.distributed as dist
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    started = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    t = torch.arange(4.0, device="cuda")
    dist.all_reduce(t); dist.barrier(); torch.cuda.synchronize()
    info["nccl_one_process"] = {"all_reduce_ok": t.tolist() == [0.0, 1.0, 2.0, 3.0],
                                "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
                                "seconds": time.perf_counter() - started}
    dist.destroy_process_group()
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
PY

step cuda_tests 180 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$WORK/cuda_tests.xml"

step assets 120 "$python" -m pipeline.cli tiny-assets "$WORK/assets" --shape gpt2-small \
  --tokenizer "$SHARED_DATA/gpt2-tokenizer/gpt2.tiktoken"
cat > "$WORK/params.yaml" <<YAML
$(sed -e "s#^  name: .*#  name: $WORK/assets/model#" -e "s#^  dataset: .*#  dataset: $SHARED_DATA/gsm8k#" \
      -e "s#^  store: .*#  store: $WORK/activations#" -e "s#^  out_dir: .*#  out_dir: $WORK/artifacts#" \
      -e "s#^  max_docs: .*#  max_docs: $MAX_DOCS#" -e "s#^  device: .*#  device: $DEVICE#" params.yaml)
YAML
P="--params $WORK/params.yaml"

step bench 300 "$python" -m pipeline.cli bench $P --docs "$BENCH_DOCS" --tokens "$BENCH_TOKENS" --out "$WORK/bench.json"
step extract 150 "$python" -m pipeline.cli extract $P
step train 150 "$python" -m pipeline.cli train $P --config all
step evaluate 150 "$python" -m pipeline.cli evaluate $P
step analyze 150 "$python" -m pipeline.cli analyze $P
step report 120 "$python" -m pipeline.cli report $P
cp "$WORK/artifacts/report.md" "$OUT_DIR/report.md" 2>/dev/null
step compiled_step 240 "$python" - "$WORK/params.yaml" "$WORK/compiled_step.json" <<'PY'
import json, sys
from bench.figures import bench_compiled_step
from bench.reference import reference_config
from pipeline.core.device import resolve_device
from pipeline.params import load_params
from pipeline.tiny import SHAPES
params = load_params(sys.argv[1])
d_model = SHAPES["gpt2-small"][1]
_, c = reference_config(params, d_model)
figure = bench_compiled_step(resolve_device(params.train.device), params.train.amp, d_model, c.width(d_model),
                             c.batch_size * params.train.seq_len, params.train.k)
json.dump(figure, open(sys.argv[2], "w"), indent=2)
print(json.dumps(figure, indent=2))
PY

step synth16k 420 "$python" -m pipeline.cli run --params params-synth-16k.yaml -S synth.n_train="$SYNTH_SAMPLES" \
  -S synth.device="$DEVICE" -S train.device="$DEVICE" -S extract.store="$WORK/synthetic-16k" \
  -S train.out_dir="$WORK/synthetic-16k"
cp "$WORK/synthetic-16k/report.md" "$OUT_DIR/synth16k-report.md" 2>/dev/null

"$python" - "$WORK" "$OUT_DIR/device-check.json" <<'PY'
import glob, json, os, sys
import xml.etree.ElementTree as ET
work, out = sys.argv[1:]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
result = {"steps": {os.path.basename(p)[: -len(".step.json")]: load(p) for p in sorted(glob.glob(f"{work}/*.step.json"))},
          "environment": load(f"{work}/environment.json"), "bench": load(f"{work}/bench.json")}
try:
    suite = ET.parse(f"{work}/cuda_tests.xml").getroot().find("testsuite")
    result["cuda_tests"] = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError):
    result["cuda_tests"] = None
result["train"] = {os.path.basename(p): load(p) for p in sorted(glob.glob(f"{work}/artifacts/details/train_*.json"))}
result["compiled_step"] = load(f"{work}/compiled_step.json")
result["browser_bytes"] = {p.split("/")[-2]: os.path.getsize(p) for p in glob.glob(f"{work}/artifacts/browser/*/features.js")}
result["evaluate"] = {os.path.basename(p): load(p) for p in sorted(glob.glob(f"{work}/artifacts/metrics/eval_*.json"))}
result["synth16k"] = {os.path.basename(p): load(p) for p in sorted(glob.glob(f"{work}/synthetic-16k/metrics/*.json"))}
result["synth16k_train"] = {os.path.basename(p): {k: (load(p) or {}).get(k) for k in ("train_time_s", "tokens_per_s",
                            "run_wall_time_s", "loader_stall_s", "sparsity_coefficient", "hardware")}
                            for p in sorted(glob.glob(f"{work}/synthetic-16k/details/train_*.json"))}
json.dump(result, open(out, "w"), indent=2, default=str)
print("results:", out)
PY
