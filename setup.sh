#!/usr/bin/env bash
# One-step setup for a fresh Debian machine (run as root or with sudo rights for apt):
#   ./setup.sh          system packages + .venv with the CPU runtime
#   ./setup.sh --dev    the same plus the test tools (pytest; chromium and xvfb for browser and window tests)
# Safe to re-run: each step is skipped when already done. Downloads only from the package
# registries (Debian, PyPI); no model weights are fetched from any hub.
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --dev or --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3.11}
APT_PKGS=(espeak-ng libespeak-ng1 sox libportaudio2 jackd2)
if [[ $DEV == 1 ]]; then APT_PKGS+=(chromium xvfb); fi  # xvfb: a display for the preview-window test
if [[ $DEV == 1 ]]; then APT_PKGS+=(nginx libnginx-mod-rtmp janus); fi  # broadcast tests: an RTMP server and a Janus SFU

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
EXTRAS="cpu,mic"; [[ $DEV == 1 ]] && EXTRAS="cpu,mic,dev"
# Re-install only when the project's dependency list changed.
stamp=".venv/.setup-$(cat pyproject.toml setup.sh | sha1sum | cut -c1-12)-$EXTRAS"
if [[ ! -f $stamp ]]; then
  echo "[setup] installing Python packages (extras: $EXTRAS)"
  $VPY -m pip install -q --upgrade pip
  # torch first, pinned, so nothing later can pull a CUDA build.
  $VPY -m pip install -q "torch==2.13.0"
  $VPY -m pip install -q -e ".[$EXTRAS]"
  # These two are installed without their declared dependencies (see pyproject.toml).
  $VPY -m pip install -q --no-deps "openai-whisper==20250625" "mediapipe==0.10.21"
  rm -f .venv/.setup-*
  touch "$stamp"
fi
echo "[setup] ready: $($VPY -c 'import realtime_avatar, torch; print("realtime_avatar", realtime_avatar.__version__, "torch", torch.__version__)')"
