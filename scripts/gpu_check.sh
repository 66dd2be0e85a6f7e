#!/usr/bin/env bash
# The GPU checks of one device lease (H100/H200 node without network, DVC or MLflow): the ImageNet-256
# profile's smoke at real size (mtdiff bench smoke), then the DiT parity sweep's points in-process
# (mtdiff.pipeline.local_sweep), until the time runs out. Wheels the node lacks come in .whl/, Fashion-MNIST
# in .fmnist/. Usage: scripts/gpu_check.sh <commit> <seconds> [points...]; results under $OUT.
set -u
commit=$1; total_s=$2; shift 2
start=$(date +%s)
out=${OUT:-/tmp/gpu_check}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 3
export PYTHONPATH=/tmp/site:$PWD MTDIFF_FMNIST_DIR=$PWD/.fmnist PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
timeout 210 python3 -m mtdiff.cli bench smoke --device cuda --steps 150 2>&1 | tee "$out/smoke.txt"
left=$(( total_s - ($(date +%s) - start) - 15 ))
echo "sweep: ${left} s left"
timeout "$left" python3 -m mtdiff.pipeline.local_sweep configs/sweeps/dit_reference.yaml --commit "$commit" \
  --budget-s $(( left - 100 )) --points "$@" 2>&1 | tee "$out/sweep.log" | grep -v " INFO " 
tar czf "$out/points.tgz" sweeps/dit_reference/points 2>/dev/null
ls -la "$out"
