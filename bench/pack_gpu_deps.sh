#!/usr/bin/env bash
# Pack the GPU-only dependencies into .gpu/ so ONE device call can carry them (64 MiB limit):
# megatron-core's cp312 wheel, and mamba-ssm / causal-conv1d from the sm_90 wheels with their
# CUDA extensions stripped of symbols and xz-compressed (the two wheels alone are 63 MiB).
#   bash bench/pack_gpu_deps.sh [WHEEL_DIR]      (default ../shared/wheels-sm90)
# Then on the GPU machine:  source bench/gpu_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-../shared/wheels-sm90}
OUT=.gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$OUT" megatron-core==0.16.1
for pkg in mamba_ssm causal_conv1d; do
    wheel=$(ls "$WHEELS"/${pkg}-*.whl)
    mkdir -p "$work/$pkg" && unzip -q "$wheel" -d "$work/$pkg"
    (cd "$work/$pkg" && tar --exclude='*.so' -cJf "$OLDPWD/$OUT/${pkg}_py.tar.xz" .)
    for so in "$work/$pkg"/*.so; do
        strip --strip-unneeded "$so"
        xz -T0 -9 -c "$so" > "$OUT/$(basename "$so").xz"
    done
done
du -ch "$OUT"/* | tail -1
