#!/usr/bin/env bash
# Multi-process ranker on a CUDA machine (issue 21): a CUDA training step in one process, a 1-process
# NCCL group (`--nproc 1`), the refusal of two ranks on one GPU, and the exact merge of an NCCL-gathered
# evaluation. Run from the repository root with the project importable; about 2-4 minutes.
#
#     bash bench/ddp_device_check.sh                    # MUSE_DATA_DIR is a fresh temporary folder
#     MUSE_DEVICE=cpu bash bench/ddp_device_check.sh    # the same steps with gloo (no step 4)
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:-$PWD}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export MUSE_DATA_DIR="$work/data" MUSE_DEVICE="${MUSE_DEVICE:-cuda}"
muse() { python -m muse_cli "$@"; }

python - <<'EOF'
import torch
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, {torch.cuda.device_count()} GPU(s), "
      f"nccl {torch.distributed.is_nccl_available()}")
EOF
python -c "from bench.taobao_mm_synth import SynthConfig, generate; generate('$work/raw', SynthConfig(n_users=300))" >/dev/null
muse db upgrade >/dev/null
muse data taobao-mm "$work/raw" --name synth 2>/dev/null | sed -n 1p

echo "== 1. one process on $MUSE_DEVICE (no process group)"
muse rank train --model muse --source scl-taobao --dataset synth --batch-size 256 --json 2>/dev/null \
  | python -c "import json,sys; d=json.load(sys.stdin); print('run', d['run'], 'GAUC', d['overall']['gauc'], 'samples/s', round(d['train']['samples_per_s']))"

echo "== 2. --nproc 1: a 1-process group (NCCL on CUDA), sparse item table (sparse_min_rows=100)"
muse rank train --model muse --source scl-taobao --dataset synth --batch-size 256 --nproc 1 \
  --set sparse_min_rows=100 --set eval_batch_size=256 --json 2>/dev/null > "$work/nccl.json"
run=$(python -c "import json; print(json.load(open('$work/nccl.json'))['run'])")
muse rank show "$run" | sed -n 1,2p

echo "== 3. the NCCL-gathered evaluation equals a one-process evaluation (expect: True)"
muse rank eval "$run" --json --nproc 1 2>/dev/null > "$work/e_nccl.json"
muse rank eval "$run" --json 2>/dev/null > "$work/e_one.json"
python - "$work" <<'EOF'
import json, sys
w = sys.argv[1]
t, a, b = (json.load(open(f"{w}/{n}.json")) for n in ("nccl", "e_nccl", "e_one"))
print(all(a[s] == b[s] for s in ("overall", "long_history")), a["overall"], b["overall"])
print("GAUC at training (on the run's device) and re-evaluated (CPU):", t["overall"]["gauc"], b["overall"]["gauc"])
EOF

if [[ "$MUSE_DEVICE" == cuda* ]]; then
  echo "== 4. more ranks than GPUs are refused with a sentence (expect: exit 2, 'has no GPU')"
  n=$(python -c "import torch; print(torch.cuda.device_count())")
  set +e
  muse rank train --model din --esu ta --dataset synth --batch-size 256 --nproc $((n + 1)) 2>&1 | grep '^error:'
  echo "exit ${PIPESTATUS[0]}"
  set -e
fi
