#!/usr/bin/env bash
# The GPU benchmark as one script: tinygrad's CUDA (or NV) backend beside torch + PEFT on the same GPU.
#   bash bench/gpu.sh OUTDIR [CUDA|NV]
#   PARTS="model big" bash bench/gpu.sh OUTDIR   # some parts only: model bigtorch big linear autograd startup
# Needs tinygrad, torch (with CUDA), transformers and peft. Each part has its own time limit, appends its tables to
# OUTDIR/bench.md and writes OUTDIR/<part>.json as it finishes, so a part that runs out of time costs only itself.
# Finds libnvrtc for tinygrad when it is not on the library path (pip's nvidia-cuda-nvrtc wheel puts it inside site-packages).
set -u -o pipefail
out=${1:?usage: bash bench/gpu.sh OUTDIR [CUDA|NV]}; dev=${2:-CUDA}; torch_dev=${TORCH_DEVICE:-cuda}
mkdir -p "$out"; cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/nvidia/lib64:/usr/local/nvidia/lib
if [ -z "${NVRTC_PATH:-}" ] && [ ! -e /usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so ]; then
  NVRTC_PATH=$(python3 -c "import glob, site; print(min((p for d in site.getsitepackages() for p in glob.glob(d + '/nvidia/**/libnvrtc.so*', recursive=True) if 'builtins' not in p), default=''))")
  export NVRTC_PATH
fi
# tinygrad's CPU device, which the GPU backends use for host-side work, compiles C with $CC as clang
if command -v clang >/dev/null; then export CC=clang; else export CC=$PWD/bench/gcc-as-clang.sh; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/bench.md"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/bench.md"
echo "NVRTC_PATH=${NVRTC_PATH:-}" | tee -a "$out/bench.md"
DEV=$dev timeout 120 python3 -c "from tinygrad import Tensor, Device; print(Device.DEFAULT, (Tensor.arange(8) @ Tensor.arange(8)).item())" \
  2>&1 | tee -a "$out/bench.md" | tail -3 || { echo "tinygrad $dev does not run"; exit 1; }

part() {  # part NAME SECONDS ARGS...
  local name=$1 secs=$2; shift 2
  [[ " ${PARTS:-model bigtorch big linear autograd startup} " == *" $name "* ]] || return 0
  { echo "== $name: $*"
    timeout "$secs" python3 bench/run.py --device "$dev" --torch-device "$torch_dev" --json "$out/$name.json" "$@" 2>&1
    echo "rc=$?"; } | grep -v "leaked semaphore\|warnings.warn" | tee -a "$out/bench.md"
}
big='{"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 32,
      "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 512}'
part model ${T_MODEL:-110} --sections model,torch --steps 20
# tinygrad and torch in separate processes here: the shared-process run at this size failed in torch
# (CUBLAS_STATUS_EXECUTION_FAILED) while run.py still synchronised tinygrad's device around torch's steps; it no
# longer does, but only this separate-process layout was run since
part bigtorch ${T_BIGTORCH:-60} --sections torch --steps 10 --batch 4 --seq 512 --model "$big"
part big ${T_BIG:-140} --sections model --steps 10 --batch 4 --seq 512 --model "$big"
part linear ${T_LINEAR:-100} --sections linear --dims 1024,2048,4096 --ranks 8,16,64 --reps 20
part autograd ${T_AUTOGRAD:-70} --sections model,torch --steps 20 --base-backward autograd
part startup ${T_STARTUP:-90} --sections startup
