#!/usr/bin/env bash
# The evidence suite, one job after the other, 1 thread each, on the product API (built-in tasks).
# Usage: bash research/experiments/run_all.sh [step ...]   (default: every step, in this order)
# Each step writes research/results/<name>.json and logs/<name>.log; then make_report.py builds (unless NO_REPORT=1)
# research/README.md from the JSONs.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
E=research/experiments
O=research/results
mkdir -p "$O/logs"

step() {
  local name=$1; shift
  echo "[$(date +%H:%M:%S)] $name: $*"
  "$PY" "$@" --out "$O/$name.json" > "$O/logs/$name.log" 2>&1
}

run() {
  case $1 in
    removal_mlp) step removal_mlp $E/exp_removal.py --setup mlp --seeds 0 1 2 ;;
    ablation_mlp) step ablation_mlp $E/exp_ablation.py --setup mlp --group layers.0 ;;
    ablation_mlp_layer2) step ablation_mlp_layer2 $E/exp_ablation.py --setup mlp --group layers.1 ;;
    finetune_mlp) step finetune_mlp $E/exp_finetune_driver.py --task digits-mlp --targets 0.3 0.5 0.7 \
                    --seeds 0 1 2 --round-fraction 0.1 \
                    --methods hybrid_rank spectral wanda_sp flap act_var taylor l1 random ;;
    removal_cnn) step removal_cnn $E/exp_removal.py --setup cnn --seeds 0 --scopes all --modes oneshot iter10_nbh \
                   --methods spectral spectral_top_first spectral_sym hybrid_rank wanda_sp flap act_var taylor random \
                   --no-round-study ;;
    finetune_cnn) step finetune_cnn $E/exp_finetune_driver.py --task mnist-cnn --targets 0.5 --seeds 0 \
                    --round-fraction 0.1 --methods hybrid_rank spectral wanda_sp taylor random ;;
    removal_minilm) step removal_minilm $E/exp_removal.py --setup minilm --scopes all \
                      --fractions 0.25 0.5 --modes oneshot iter10_nbh --no-round-study \
                      --methods spectral spectral_full hybrid_rank wanda_sp flap act_var taylor random ;;
    removal_minilm_knobs) step removal_minilm_knobs $E/exp_removal.py --setup minilm --scopes all \
                            --fractions 0.25 0.5 --modes oneshot --no-round-study --methods spectral_s2 spectral_s8 ;;
    removal_minilm_layer) step removal_minilm_layer $E/exp_removal.py --setup minilm --scopes layer1 \
                            --fractions 0.25 0.5 --modes oneshot --no-round-study \
                            --methods spectral spectral_full hybrid_rank wanda_sp flap act_var taylor random ;;
    removal_minilm_heads) step removal_minilm_heads $E/exp_removal.py --setup minilm_heads --scopes all \
                            --fractions 0.25 0.5 --modes oneshot --no-round-study \
                            --methods spectral spectral_s2 hybrid_rank wanda_sp taylor random ;;
    removal_minilm_heads_knobs) step removal_minilm_heads_knobs $E/exp_removal.py --setup minilm_heads \
                                  --scopes all --fractions 0.25 0.5 --modes oneshot iter1head --no-round-study \
                                  --methods spectral_s2 spectral_s8 spectral_rev spectral_sym spectral_raw ;;
    finetune_minilm) step finetune_minilm $E/exp_finetune_driver.py --task minilm-rt --targets 0.2 0.4 \
                       --seeds 0 1 2 --round-fraction 0.1 --methods spectral hybrid_rank wanda_sp taylor random ;;
    ablation_minilm) step ablation_minilm $E/exp_ablation.py --setup minilm --units 192 \
                       --methods spectral spectral_full spectral_rev hybrid hybrid_rank wanda_sp flap act_var act_mean weight_l1 taylor random ;;
    removal_smollm2) step removal_smollm2 $E/exp_removal.py --setup smollm2 --scopes all --fractions 0.25 0.5 \
                       --methods spectral hybrid_rank wanda_sp random --modes oneshot --no-round-study ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}

main() {
  local steps=("$@")
  [ ${#steps[@]} -eq 0 ] && steps=(removal_mlp ablation_mlp
                                   ablation_mlp_layer2 finetune_mlp removal_cnn removal_minilm finetune_cnn
                                   removal_smollm2 removal_minilm_knobs removal_minilm_layer removal_minilm_heads
                                   removal_minilm_heads_knobs finetune_minilm
                                   ablation_minilm)
  for s in "${steps[@]}"; do run "$s"; done
  [ -n "${NO_REPORT:-}" ] || "$PY" $E/make_report.py  # NO_REPORT=1: leave the page alone
}

# parsed in full before anything runs, so editing this file does not disturb a running suite
main "$@"; exit
