#!/bin/sh
# Builder stage of both images: the pinned stack of requirements.txt into the virtual environment $2.
#   install-deps.sh cpu|gpu VENV REQUIREMENTS
# Certificates and the package index come as build secrets (mounted at /run/secrets/, never in a
# layer): pip_ca, a CA bundle (a proxy that re-signs TLS); pip_conf, a pip.conf naming the index.
# Build args read here: TORCH_INDEX_URL (empty: torch from the default index, PyPI) and, for gpu,
# TORCH_CUDA (the CUDA version torch must be built for) and FAISS_GPU (the faiss wheel that replaces
# faiss-cpu).
set -eu
variant=$1 venv=$2 requirements=$3

[ -s /run/secrets/pip_ca ] && export PIP_CERT=/run/secrets/pip_ca
[ -s /run/secrets/pip_conf ] && export PIP_CONFIG_FILE=/run/secrets/pip_conf
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

pin() {  # the line pinning $1 in requirements.txt (one version for the image and the dev venv)
    grep -E "^$1==" "$requirements" || { echo "install-deps.sh: no '$1==' pin in $requirements" >&2; exit 1; }
}

python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install --upgrade pip setuptools wheel

# torch and torchvision first, from TORCH_INDEX_URL when given (e.g. the PyTorch CPU index)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$pip" install "$(pin torch)" "$(pin torchvision)" --index-url "$TORCH_INDEX_URL"
else
    "$pip" install "$(pin torch)" "$(pin torchvision)"
fi

# the rest; ruff and mypy lint the checkout and are left out; DeepSpeed comes last (below)
rest=/tmp/requirements-image.txt
grep -v -E '^(ruff|mypy|deepspeed)==' "$requirements" > "$rest"
case "$variant" in
cpu)
    "$pip" install -r "$rest"
    # DeepSpeed's CPU accelerator builds its shared-memory collectives op (deepspeed_shm_comm) at the
    # first init_distributed; built here, ahead of time, the runtime image needs no compiler
    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
        "$pip" install --no-build-isolation "$(pin deepspeed)"
    "$venv/bin/python" -c "from deepspeed.git_version_info import installed_ops as ops; \
assert ops.get('deepspeed_shm_comm'), ops; print('deepspeed prebuilt ops:', [k for k, v in ops.items() if v])"
    ;;
gpu)
    # faiss-gpu replaces faiss-cpu (both install the module faiss)
    sed -i -E '/^faiss-cpu==/d' "$rest"
    "$pip" install -r "$rest" "$FAISS_GPU"
    # no op prebuilt: on CUDA the trainer uses none (torch optimizers, NCCL collectives)
    DS_ACCELERATOR=cuda DS_BUILD_OPS=0 "$pip" install "$(pin deepspeed)"
    "$venv/bin/python" -c "import sys, torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'CUDA', cuda); \
sys.exit(0 if cuda == sys.argv[1] else f'torch is built for CUDA {cuda}, the image declares TORCH_CUDA={sys.argv[1]}')" \
        "$TORCH_CUDA"
    ;;
*)
    echo "install-deps.sh: unknown variant $variant (cpu or gpu)" >&2; exit 1 ;;
esac
"$pip" check
# DS_ACCELERATOR as the image sets it (cpu; the GPU image leaves DeepSpeed to find the GPU at run time)
[ "$variant" = cpu ] && export DS_ACCELERATOR=cpu
"$venv/bin/python" -c "import torch, torchvision, faiss, deepspeed, timm; print('imports ok: torch', torch.__version__)"
rm -f "$rest"
