# Source on the GPU machine (repo root, .gpu/ carried; see bench/pack_gpu_deps.sh):
#   source bench/gpu_env.sh
# Installs megatron-core, mamba-ssm and causal-conv1d into $SITE and puts it and the repo on
# PYTHONPATH. Keeps NVLink multicast off (the lending machines require it).
SITE=${SITE:-/tmp/site}
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/megatron_core-*.whl
for t in .gpu/*_py.tar.xz; do tar -xJf "$t" -C "$SITE"; done
for so in .gpu/*.so.xz; do xz -dc "$so" > "$SITE/$(basename "${so%.xz}")"; done
export PYTHONPATH="$SITE:$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -c "import megatron.core, mamba_ssm, causal_conv1d; print('gpu env: megatron-core', megatron.core.__version__, 'mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', causal_conv1d.__version__)"
