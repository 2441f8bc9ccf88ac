# CUDA image for pretraining BlackMamba with megatron_blackmamba on NVIDIA H100 / A100.
#
#   docker build -t megatron-blackmamba .
#   docker build --build-arg INSTALL_TE=1 --build-arg INSTALL_APEX=1 -t megatron-blackmamba:full .
#
#   # one node, 8 GPUs (the repo is baked in at /workspace/megatron_blackmamba)
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v $PWD/runs:/workspace/megatron_blackmamba/runs megatron-blackmamba \
#       launch/local.sh 8 configs/blackmamba-340m-1.5b.yaml data.blend=/data/processed/blend.txt \
#       data.tokenizer=/data/tokenizers/gpt-neox-20b/tokenizer.json
#
#   # SLURM + pyxis/enroot: run the ranks inside the image (submit from a checkout of the repo)
#   SRUN_EXTRA_ARGS="--container-image=megatron-blackmamba --container-mounts=/data:/data,$PWD:$PWD \
#       --container-workdir=$PWD" LAYOUT_CHECK=0 sbatch launch/blackmamba.sbatch configs/...
#
# Version pins, consistent with pyproject.toml (megatron-core==0.16.1, torch>=2.6, Python >= 3.10;
# the project is developed on 3.11) and with megatron-core 0.16.1's own extras (mamba-ssm~=2.2,
# causal-conv1d~=1.5, transformer-engine>=2.9,<2.12). Change them together.
#
# The devel (nvcc) base is deliberate: mamba-ssm, causal-conv1d, transformer-engine and apex
# download a prebuilt wheel matching torch/CUDA/C++-ABI when one exists and compile otherwise.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG MEGATRON_CORE_VERSION=0.16.1
ARG MAMBA_SSM_VERSION=2.2.6.post3
ARG CAUSAL_CONV1D_VERSION=1.5.3.post1
ARG DEEPSPEED_VERSION=0.17.6
# Optional, slow to build (tens of minutes each). The trainer runs without them (PyTorch fallbacks).
ARG INSTALL_TE=0
ARG TE_VERSION=2.10.0
ARG INSTALL_APEX=0
ARG APEX_REF=master
# megatron's GroupedMLP for model.moe_grouped_gemm=true without TE
ARG INSTALL_GROUPED_GEMM=0
ARG GROUPED_GEMM_VERSION=1.1.4.post8
# Only compile for the GPUs we train on (A100 = 8.0, H100/H200 = 9.0); fewer archs, faster builds.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=16

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS}

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10), headers for extension builds.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates curl git \
        build-essential ninja-build \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        python${PYTHON_VERSION} python${PYTHON_VERSION}-dev python${PYTHON_VERSION}-venv \
 && rm -rf /var/lib/apt/lists/*

RUN python${PYTHON_VERSION} -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
RUN pip install --upgrade pip setuptools wheel packaging ninja

# PyTorch built for CUDA 12.8 (first: every extension below compiles against it).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}"

# Mamba-1 selective-scan and causal-conv1d CUDA kernels (the model uses them on CUDA, the pure
# PyTorch versions elsewhere). --no-build-isolation: build against the torch installed above.
RUN pip install --no-build-isolation "causal-conv1d==${CAUSAL_CONV1D_VERSION}" \
 && pip install --no-build-isolation "mamba-ssm==${MAMBA_SSM_VERSION}"

RUN if [ "${INSTALL_TE}" = "1" ]; then \
        pip install --no-build-isolation "transformer-engine[pytorch]==${TE_VERSION}"; \
    fi

RUN if [ "${INSTALL_APEX}" = "1" ]; then \
        git clone https://github.com/NVIDIA/apex /tmp/apex \
     && cd /tmp/apex && git checkout "${APEX_REF}" \
     && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation . \
     && cd / && rm -rf /tmp/apex; \
    fi

RUN if [ "${INSTALL_GROUPED_GEMM}" = "1" ]; then \
        pip install --no-build-isolation "nv-grouped-gemm==${GROUPED_GEMM_VERSION}"; \
    fi

# DeepSpeed with its ops JIT-compiled on first use (DS_BUILD_OPS=0): profiling / comparison
# utilities; the trainer itself uses megatron-core only. wandb comes with the project below.
RUN DS_BUILD_OPS=0 pip install "deepspeed==${DEEPSPEED_VERSION}"

# The project, editable, with its CUDA extras (mamba-ssm, causal-conv1d, triton: already
# satisfied above, so pip keeps the pinned builds) and the test tools.
WORKDIR /workspace/megatron_blackmamba
COPY . .
RUN pip install -e ".[cuda,test]" \
 && python -c "import megatron.core, megatron_blackmamba, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', megatron.core.__version__)" \
 && python -m megatron_blackmamba.train --help-config > /dev/null

# Runtime defaults the launchers also set (see launch/blackmamba.sbatch for why).
ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_NVLS_ENABLE=0

CMD ["bash"]
