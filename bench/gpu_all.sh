#!/usr/bin/env bash
# Every part of bench/gpu.py on one CUDA machine, each in its own process under its own time limit, so that a part
# that fails or runs long costs only itself (a GPU lent for minutes: plan about 9 minutes in all).
#
#   bash bench/gpu_all.sh OUT_DIR [PYTHON]
#
# Writes OUT_DIR/gpu_<part>.json and OUT_DIR/gpu_<part>.log per part; exits non-zero if any part failed.
# Parts, in order of what matters most: core (decoder vs plain diffusers at batch 1 and 8, the 7B-shaped LLM's
# tokens/s, end to end), deployment (the decoder through the Ray Serve graph beside plain diffusers, one chat
# request over HTTP), fastpath (one row per DecoderConfig.fast_path option, compile rows last).
# Limits in seconds: GPU_CORE_S (170), GPU_DEPLOYMENT_S (190), GPU_FASTPATH_S (200). GPU_PARTS picks parts
# (default core,deployment,fastpath).
set -u
out=${1:?usage: bash bench/gpu_all.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.." || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_machine.log"
"$py" -c "import sys, torch, transformers, diffusers, ray; import polymodal.pipeline, services.app; \
print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, \
'diffusers', diffusers.__version__, 'ray', ray.__version__)" 2>&1 | tee -a "$out/gpu_machine.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_all: the imports failed (above)"; exit 3; }
git rev-parse HEAD >> "$out/gpu_machine.log" 2>/dev/null
failed=0
run_part() {  # name, limit, bench/gpu.py arguments...
  local name=$1 limit=$2
  shift 2
  [[ ",${GPU_PARTS:-core,deployment,fastpath}," == *",$name,"* ]] || return 0
  echo "== part $name (limit ${limit} s) =="
  timeout -k 10 "$limit" "$py" bench/gpu.py "$@" --out "$out/gpu_$name.json" > "$out/gpu_$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/gpu_$name.log"
  [ $rc -eq 0 ] || { echo "gpu_all: part $name exited $rc"; failed=1; }
}
run_part core "${GPU_CORE_S:-170}" --parts decoder,llm,e2e
run_part deployment "${GPU_DEPLOYMENT_S:-190}" --parts deployment
run_part fastpath "${GPU_FASTPATH_S:-200}" --parts fastpath
exit $failed
