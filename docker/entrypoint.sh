#!/bin/sh
# polymodal container entrypoint (runs under dumb-init as PID 1).
#
#   docker run IMAGE                       -> polymodal serve --preset $POLYMODAL_PRESET --host $POLYMODAL_HOST --port $POLYMODAL_PORT
#   docker run IMAGE --preset tiny --no-ray -> the same with these options appended (the last --preset/--port wins)
#   docker run IMAGE serve run /opt/polymodal/deploy/serve-cpu.yaml -> Ray Serve config (shared-memory check first)
#   docker run IMAGE polymodal presets     -> any other command runs as given
#
# Environment: POLYMODAL_PRESET (default: the build's PRESET), POLYMODAL_HOST (0.0.0.0), POLYMODAL_PORT (8000),
# POLYMODAL_CACHE / HF_HOME (the model cache volume, /cache), POLYMODAL_OFFLINE=1 (weights are mounted:
# never reach a model hub), POLYMODAL_MIN_SHM_MB (the /dev/shm size below which start-up warns; 1024).
set -eu

log() { echo "polymodal-entrypoint: $*" >&2; }

# Ray sizes its object store at 30% of the memory it sees and, when /dev/shm is smaller than that, moves it to
# disk (slow). When /dev/shm is big enough to be worth using, size the store to fit it instead (unless
# RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION is set): the proportion 0.9 x shm / memory (cgroup limit aware).
fit_object_store() {
  [ -z "${RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION:-}" ] || return 0
  shm_kb=$(df -Pk "${POLYMODAL_SHM_PATH:-/dev/shm}" 2>/dev/null | awk 'NR == 2 { print $2 }')
  mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null)
  [ -n "$shm_kb" ] && [ -n "$mem_kb" ] || return 0
  limit=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || true)
  case "$limit" in
    "" | *[!0-9]*) ;;
    *) if [ $((limit / 1024)) -lt "$mem_kb" ]; then mem_kb=$((limit / 1024)); fi ;;
  esac
  p=$(awk -v s="$shm_kb" -v m="$mem_kb" 'BEGIN { p = 0.9 * s / m; if (p > 0.3) p = 0.3; printf "%.4f", p }')
  export RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="$p"
  log "Ray object store: ${p} of $((mem_kb / 1024)) MiB, to fit /dev/shm ($((shm_kb / 1024)) MiB)"
}

# Warn (polymodal-check-shm) when /dev/shm is too small for Ray; else fit Ray's object store into it.
ray_shm() { if polymodal-check-shm; then fit_object_store; fi; }

if [ "${POLYMODAL_OFFLINE:-0}" = 1 ]; then
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
  log "offline mode: weights come from the mounted cache/paths only (HF_HUB_OFFLINE=1)"
fi

for dir in "${POLYMODAL_CACHE:-}" "${HF_HOME:-}"; do
  [ -n "$dir" ] || continue
  if ! mkdir -p "$dir" 2>/dev/null || ! [ -w "$dir" ]; then
    log "WARNING: cache folder $dir is not writable by uid $(id -u); converted weights will not be cached."
    log "         Use a named volume (-v polymodal-cache:/cache) or chown the host folder to uid $(id -u)."
  fi
done

case "${1:-}" in
  "" | -*) ;;                                           # no command or options only: polymodal serve
  serve | ray) ray_shm; exec "$@" ;;                    # Ray's own CLI (serve run deploy/serve-cpu.yaml)
  *) exec "$@" ;;                                       # any other command (polymodal generate ..., bash)
esac

# Remember the port actually served (the last --port wins) for the HEALTHCHECK.
port=${POLYMODAL_PORT:-8000}
no_ray=0
prev=""
for arg in "$@"; do
  case "$arg" in
    --port=*) port=${arg#--port=} ;;
    --no-ray) no_ray=1 ;;
  esac
  [ "$prev" = "--port" ] && port=$arg
  prev=$arg
done
echo "$port" > "${TMPDIR:-/tmp}/polymodal.port" 2>/dev/null || true

# Ray keeps its object store in /dev/shm; Docker gives containers 64 MiB unless told otherwise.
[ "$no_ray" = 1 ] || ray_shm

exec polymodal serve --preset "${POLYMODAL_PRESET:-toy}" --host "${POLYMODAL_HOST:-0.0.0.0}" --port "$port" "$@"
