#!/bin/sh
# Warn when /dev/shm is too small for Ray's object store (exit 1), else exit 0.
# Docker mounts a 64 MiB /dev/shm by default: run with --shm-size (e.g. --shm-size=2g); on Kubernetes mount
# an emptyDir with medium: Memory at /dev/shm (deploy/rayservice.yaml does). Threshold: POLYMODAL_MIN_SHM_MB.
set -eu
min_mb=${POLYMODAL_MIN_SHM_MB:-1024}
shm=${POLYMODAL_SHM_PATH:-/dev/shm}
if ! kb=$(df -Pk "$shm" 2>/dev/null | awk 'NR == 2 { print $2 }') || [ -z "$kb" ]; then
  echo "polymodal: WARNING: $shm is missing; Ray's object store falls back to disk (slow). Run with --shm-size=2g." >&2
  exit 1
fi
mb=$((kb / 1024))
if [ "$mb" -lt "$min_mb" ]; then
  cat >&2 <<MSG
polymodal: WARNING: $shm is only ${mb} MiB (want >= ${min_mb} MiB). Ray keeps its object store there;
polymodal: WARNING: with too little it falls back to disk (slow) or fails to pass media between deployments.
polymodal: WARNING: start the container with --shm-size=2g (docker run --shm-size=2g ...), or on Kubernetes
polymodal: WARNING: mount an emptyDir {medium: Memory} at /dev/shm. (--no-ray does not need it.)
MSG
  exit 1
fi
exit 0
