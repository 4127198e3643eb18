#!/usr/bin/env bash
# One-step setup for a fresh Debian machine (run as root or with sudo rights for apt):
#   ./setup.sh          system packages + .venv with the CPU runtime
#   ./setup.sh --dev    the same plus the test tools (pytest; chromium and xvfb for browser and window tests)
# Safe to re-run: each step is skipped when already done. Downloads only from the package
# registries (Debian, PyPI); no model weights are fetched from any hub.
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
WHICH_PYTHON=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --which-python) WHICH_PYTHON=1 ;;  # print the Python setup would use, and stop
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --dev or --help)" >&2; exit 2 ;;
  esac
done

# Python: 3.11 or 3.12. mediapipe 0.10.21 (the last release that ships its face models and the
# face-mesh API) has wheels up to 3.12 and none for 3.13; every other dependency has 3.11 and
# 3.12 wheels. Preferred: 3.11 (the whole test suite runs on it), then 3.12 (python3 on Ubuntu
# 24.04); an existing .venv of either is kept. PYTHON=/path/to/python overrides.
SUPPORTED_PYTHONS=(3.11 3.12)
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
supported() { local v; for v in "${SUPPORTED_PYTHONS[@]}"; do [[ $1 == "$v" ]] && return 0; done; return 1; }
pick_python() {
  local cand v
  if [[ -n ${PYTHON:-} ]]; then
    v=$(py_version "$PYTHON") || v=""
    supported "$v" && { echo "$PYTHON"; return 0; }
    echo "setup.sh: PYTHON=$PYTHON is Python ${v:-?}; realtime-avatar needs 3.11 or 3.12" >&2; return 1
  fi
  if [[ -x .venv/bin/python ]] && supported "$(py_version .venv/bin/python)"; then echo .venv/bin/python; return 0; fi
  for v in "${SUPPORTED_PYTHONS[@]}"; do
    for cand in "python$v" python3; do
      command -v "$cand" >/dev/null && [[ $(py_version "$cand") == "$v" ]] && { command -v "$cand"; return 0; }
    done
  done
  return 1
}
if ! PY=$(pick_python); then
  [[ -n ${PYTHON:-} ]] && exit 2
  echo "setup.sh: no Python 3.11 or 3.12 found (python3 is $(py_version python3 || echo 'missing')); install python3.12 and python3.12-venv (Ubuntu 24.04: apt-get install python3.12-venv; Debian 13: 'uv python install 3.12' or 'pyenv install 3.12'), then re-run, or set PYTHON=/path/to/python3.12" >&2
  exit 2
fi
PYV=$(py_version "$PY")
if [[ $WHICH_PYTHON == 1 ]]; then echo "$PY (Python $PYV)"; exit 0; fi
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
  if ! "$PY" -c 'import ensurepip' 2>/dev/null; then  # Debian/Ubuntu split venv support out
    echo "[setup] $PY has no venv support: installing python$PYV-venv"
    SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "python$PYV-venv" || \
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends python3-venv
  fi
  echo "[setup] creating .venv with $PY (Python $PYV)"
  "$PY" -m venv .venv
fi
if ! supported "$(py_version .venv/bin/python)"; then
  echo "setup.sh: .venv is Python $(py_version .venv/bin/python); realtime-avatar needs 3.11 or 3.12: remove .venv and re-run" >&2
  exit 2
fi
VPY=.venv/bin/python
EXTRAS="cpu,mic"; [[ $DEV == 1 ]] && EXTRAS="cpu,mic,dev"
# Re-install only when the project's dependency list changed.
stamp=".venv/.setup-$(cat pyproject.toml setup.sh | sha1sum | cut -c1-12)-$EXTRAS"
if [[ ! -f $stamp ]]; then
  echo "[setup] installing Python packages (extras: $EXTRAS)"
  $VPY -m pip install -q --upgrade pip
  # torch first, pinned, so nothing later can pull a CUDA build. PyPI's torch 2.13.0 for Linux
  # is the CUDA build (~3 GB with its nvidia-* packages) for every Python; a CPU-only build
  # comes from PyTorch's CPU wheel index: set TORCH_INDEX_URL to it (or have a CPU wheel in
  # pip's find-links, as our machines have for 3.11).
  if [[ -n ${TORCH_INDEX_URL:-} ]]; then
    $VPY -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    $VPY -m pip install -q "torch==2.13.0"
  fi
  $VPY -c 'import torch; print("[setup] torch", torch.__version__, "(CUDA build: large; see TORCH_INDEX_URL in setup.sh)" if torch.version.cuda else "(CPU build)")' 
  $VPY -m pip install -q -e ".[$EXTRAS]"
  # These two are installed without their declared dependencies (see pyproject.toml).
  $VPY -m pip install -q --no-deps "openai-whisper==20250625" "mediapipe==0.10.21"
  rm -f .venv/.setup-*
  touch "$stamp"
fi
# The Whisper encoder as an ONNX Runtime graph (a few seconds; about half the CPU time per
# encoder run, see realtime_avatar/onnx_encoder.py). Skipped when built; serve falls back to torch.
$VPY -m export.encoder_onnx >/dev/null 2>&1 || echo "[setup] note: the ONNX encoder graph was not built (python -m export.encoder_onnx says why); serve uses the torch encoder"
# The default model's render graph on ONNX Runtime (gated against torch; ~1.7x faster per frame
# than torch on the 2-core avx2 machine: 10.4 vs 17.6 ms at batch 4). Cached by weights hash.
$VPY -m export.build_engines --backend onnx --batch 4 --runs 1 --seconds 0.2 --no-torch >/dev/null 2>&1 || echo "[setup] note: the ONNX render engine was not built (python -m export.build_engines says why); serve renders with torch"
echo "[setup] ready: $($VPY -c 'import realtime_avatar, torch; print("realtime_avatar", realtime_avatar.__version__, "torch", torch.__version__)')"
