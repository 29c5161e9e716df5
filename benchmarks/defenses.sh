#!/usr/bin/env bash
# Every fine-tuning-stage defense against SFT and SAP in the synthetic world
# (docs/results/synthetic.md, "Defenses"). Seed-paired: the same seed gives every method the
# same task batches. Settings are chosen on the validation split (grid parts, seeds 0-4) and
# reported on the test split; the chosen setting then runs seeds 5-19 (final parts).
#   bash benchmarks/defenses.sh grid_safeinstr ...     # some parts
#   bash benchmarks/defenses.sh all                    # every part, two at a time
#   DEFENSES_DIR=/somewhere bash benchmarks/defenses.sh ...
# The chosen settings (CHOSEN_* below) are the ones validation picked in our run
# (benchmarks/choose_on_val.py; the report part writes its verdict to all/chosen.txt); change
# them if yours picks others. Reports: <part>/summary.md; merged into all/ by the `report` part.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEFENSES_DIR:-multirun/defenses}
GRID=seed=0,1,2,3,4
FINAL=seed=5,6,7,8,9,10,11,12,13,14,15,16,17,18,19
ALL=seed=0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19
SHORT=seed=0,1,2,3,4
LISA_STEPS="method.align_steps=20 method.finetune_steps=180"  # Lisa's 1:9 alternation, scaled to 200 steps
# chosen on validation (grid parts)
CHOSEN_SAFEINSTR="method.share=0.1"
CHOSEN_LISA="method.rho=0.01"
CHOSEN_CSFT="method.beta=0.001"
CHOSEN_LDIFS="method.rho=0.0001"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# docs/results/synthetic.md section 0 ran on the native AVX-512 path (before cpu_kernels existed);
# KERNELS=portable gives numbers every x86-64 CPU reproduces bit for bit (docs/reproducibility.md)
KERNELS=${KERNELS:-native}
# section 0's SAP found its probe every step (the default then; now every 16 steps, docs/performance.md)
PER_STEP=probe.refresh_every=1

part() {  # part <name> <overrides...>
  local name=$1; shift
  python train.py -m "$@" cpu_kernels=$KERNELS eval.before=false logger=csv trainer.enable_progress_bar=false \
    hydra.sweep.dir="$OUT/$name"
}

run_part() {
  case $1 in
    sft)              part sft data=synthetic_instruct method=sft $ALL ;;
    sap)              part sap data=synthetic_instruct method=sap $PER_STEP $ALL ;;
    sap_refresh)      part sap_refresh data=synthetic_instruct method=sap probe.refresh_every=8,16 $ALL ;;  # docs/performance.md
    sap_random)       part sap_random data=synthetic_instruct method=sap_random $ALL ;;
    grid_sap)         part grid_sap data=synthetic_instruct method=sap $PER_STEP probe.contrast=decision $GRID ;;
    grid_safeinstr)   part grid_safeinstr data=synthetic_instruct method=safeinstr method.share=0.03,0.1 $GRID ;;
    grid_lisa)        part grid_lisa data=synthetic_instruct method=lisa $LISA_STEPS method.rho=1.0,0.01 $GRID ;;
    grid_csft)        part grid_csft data=synthetic_instruct method=csft method.beta=0.1,0.5 $GRID ;;
    grid_csft_low)    part grid_csft_low data=synthetic_instruct method=csft method.beta=0.01,0.001 $GRID ;;
    grid_ldifs)       part grid_ldifs data=synthetic_instruct method=ldifs method.rho=0.0001,0.001 $GRID ;;
    final_safeinstr)  part final_safeinstr data=synthetic_instruct method=safeinstr $CHOSEN_SAFEINSTR $FINAL ;;
    final_lisa)       part final_lisa data=synthetic_instruct method=lisa $LISA_STEPS $CHOSEN_LISA $FINAL ;;
    final_csft)       part final_csft data=synthetic_instruct method=csft $CHOSEN_CSFT $FINAL ;;
    final_ldifs)      part final_ldifs data=synthetic_instruct method=ldifs $CHOSEN_LDIFS $FINAL ;;
    final_sap_decision) part final_sap_decision data=synthetic_instruct method=sap $PER_STEP probe.contrast=decision $FINAL ;;
    tasks_sft)        part tasks_sft data=synthetic_classify,synthetic_poison method=sft $SHORT ;;
    tasks_sap)        part tasks_sap data=synthetic_classify,synthetic_poison method=sap $PER_STEP $SHORT ;;
    tasks_sap_random) part tasks_sap_random data=synthetic_classify,synthetic_poison method=sap_random $SHORT ;;
    tasks_safeinstr)  part tasks_safeinstr data=synthetic_classify,synthetic_poison method=safeinstr $CHOSEN_SAFEINSTR $SHORT ;;
    tasks_lisa)       part tasks_lisa data=synthetic_classify,synthetic_poison method=lisa $LISA_STEPS $CHOSEN_LISA $SHORT ;;
    tasks_csft)       part tasks_csft data=synthetic_classify,synthetic_poison method=csft $CHOSEN_CSFT $SHORT ;;
    tasks_ldifs)      part tasks_ldifs data=synthetic_classify,synthetic_poison method=ldifs $CHOSEN_LDIFS $SHORT ;;
    report)           parts=$(ls -d "$OUT"/*/ | grep -v '/all/$')
                      python -m safeprobe.reporting --no-wandb $parts --out "$OUT/all" \
                        --reference "data=synthetic_instruct, method=sft" > /dev/null
                      python benchmarks/defenses_plot.py "$OUT/all/summary.csv" "$OUT/all/defenses.png" --min-n 20
                      python benchmarks/outcome_table.py $parts --reference "data=synthetic_instruct, method=sft" \
                        > "$OUT/all/outcomes.md"
                      python benchmarks/choose_on_val.py --sft "$OUT/sft" "$OUT/grid_safeinstr" "$OUT/grid_lisa" \
                        "$OUT/grid_csft:$OUT/grid_csft_low" "$OUT/grid_ldifs" "$OUT/sap:$OUT/grid_sap" > "$OUT/all/chosen.txt" ;;
    all)              printf '%s\n' sft grid_safeinstr grid_lisa grid_csft grid_csft_low grid_ldifs sap grid_sap sap_random \
                        final_safeinstr final_lisa final_csft final_ldifs final_sap_decision tasks_sft tasks_sap \
                        tasks_sap_random tasks_safeinstr tasks_lisa tasks_csft tasks_ldifs | xargs -P 2 -I{} bash "$0" {}
                      run_part report ;;
    *) echo "unknown part '$1'; see the case list in $0" >&2; exit 2 ;;
  esac
}

for p in "$@"; do run_part "$p"; done
exit  # parsed whole before it runs: editing this file during a sweep cannot change the sweep
