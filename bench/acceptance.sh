#!/usr/bin/env bash
# Parity with the four reference pipelines (bf16 and float32 rows) and the one-run throughput table,
# on one CUDA GPU, every output under one folder:
#
#     bash bench/acceptance.sh OUT REFS [part ...]
#
# OUT: folder for the JSON results and logs; REFS: folder holding the checkouts self-forcing,
# longlive (branch v1.0), infinity-rope and anchor-forcing. Parts (default: all, in this order):
#   parity_bf16       every case in bf16
#   parity_fp32       Self-Forcing 21 and the 45-frame Infinity-RoPE / Anchor Forcing cases, float32, TF32 off
#   parity_fp32_tf32  the two 120-frame LongLive cases, float32 with TF32 on both sides
#   throughput        the throughput rows, all in one run (fused engine rows against the reference pipelines)
set -euo pipefail
out=${1:?usage: bench/acceptance.sh OUT REFS [part ...]}
refs=${2:?usage: bench/acceptance.sh OUT REFS [part ...]}
shift 2
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(parity_bf16 parity_fp32 parity_fp32_tf32 throughput)
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
checkouts=(--self-forcing "$refs/self-forcing" --longlive "$refs/longlive"
           --infinity-rope "$refs/infinity-rope" --anchor-forcing "$refs/anchor-forcing")
for part in "${parts[@]}"; do
  case $part in
    parity_bf16)
      python "$here/parity.py" "${checkouts[@]}" --dtype bf16 --out "$out/parity_bf16.json" ;;
    parity_fp32)
      python "$here/parity.py" "${checkouts[@]}" --dtype fp32 \
        --case self_forcing_21,infinity_rope_interactive_45,anchor_interactive_45 --out "$out/parity_fp32.json" ;;
    parity_fp32_tf32)
      python "$here/parity.py" "${checkouts[@]}" --dtype fp32 --tf32 \
        --case longlive_120,longlive_interactive_120 --out "$out/parity_fp32_tf32.json" ;;
    throughput)
      python "$here/throughput.py" --self-forcing "$refs/self-forcing" --longlive "$refs/longlive" \
        --rows grounded_120+fused,grounded_apr6_120+fused,longlive_engine_120+fused,longlive_reference_120,self_forcing_reference_21,grounded_long+fused \
        --out "$out/throughput.json" ;;
    *)
      echo "unknown part '$part'; use parity_bf16, parity_fp32, parity_fp32_tf32 or throughput" >&2
      exit 2 ;;
  esac 2>&1 | tee "$out/$part.log"
done
