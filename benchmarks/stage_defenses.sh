#!/usr/bin/env bash
# Every defense in one table (docs/results/synthetic.md, "The full table"): the alignment-stage
# defenses (Vaccine, Booster, RepNoise) after their control (align=sft), both aligning the
# world's *base* model (model.variant=base) as their papers align a base model; the repairs
# (SafeLoRA, Antidote) after SFT and SAP on the chat model; SAP and SFT on the chat model
# (the fine-tuning-stage rows, with the other fine-tuning-stage defenses, are benchmarks/defenses.sh);
# and the compositions (each alignment-stage defense + SAP, SAP + SafeLoRA). Three tasks, five
# paired seeds. Each stage defense's setting is chosen on the validation split among its
# authors' alternatives (grid parts, instruction task), then reported on the test split.
#   bash benchmarks/stage_defenses.sh all       # everything, two jobs at a time, then the report
#   bash benchmarks/stage_defenses.sh grid_vaccine report   # some parts
#   STAGES_DIR=/somewhere bash benchmarks/stage_defenses.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${STAGES_DIR:-multirun/stages}
SEEDS=seed=0,1,2,3,4
TASKS=data=synthetic_instruct,synthetic_classify,synthetic_poison
OTHER_TASKS=data=synthetic_classify,synthetic_poison
COMPOSED_TASKS=data=synthetic_instruct,synthetic_poison  # + SAP; the classification task: the *_classify parts
BASE=model.variant=base
# chosen on validation (grid parts; the report part writes the verdict to all/chosen.txt)
CHOSEN_VACCINE="align.method.rho=2.0"
CHOSEN_BOOSTER="align.method.lam=25.0"
CHOSEN_REPNOISE="align.method.alpha=0.1"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
KERNELS=${KERNELS:-native}  # the path of docs/results/synthetic.md section 0 (defenses.sh)

part() {  # part <name> <overrides...>
  local name=$1; shift
  python train.py -m "$@" cpu_kernels=$KERNELS eval.before=false logger=csv trainer.enable_progress_bar=false \
    hydra.sweep.dir="$OUT/$name"
}

run_part() {
  case $1 in
    control)        part control $TASKS method=sft $SEEDS ;;
    sap)            part sap $TASKS method=sap $SEEDS ;;
    repairs)        part repairs $TASKS method=sft,sap post=safelora $SEEDS ;;
    antidote)       part antidote $TASKS method=sft post=antidote $SEEDS ;;
    aligned)        part aligned $TASKS $BASE align=sft method=sft,sap $SEEDS ;;
    grid_vaccine)   part grid_vaccine data=synthetic_instruct $BASE align=vaccine align.method.rho=2.0,10.0 method=sft $SEEDS ;;
    grid_booster)   part grid_booster data=synthetic_instruct $BASE align=booster align.method.lam=5.0,25.0 method=sft $SEEDS ;;
    grid_repnoise)  part grid_repnoise data=synthetic_instruct $BASE align=repnoise align.method.alpha=1.0,0.1 method=sft $SEEDS ;;
    final_vaccine)  part final_vaccine $OTHER_TASKS $BASE align=vaccine $CHOSEN_VACCINE method=sft $SEEDS ;;
    sap_vaccine)    part sap_vaccine $COMPOSED_TASKS $BASE align=vaccine $CHOSEN_VACCINE method=sap $SEEDS ;;
    final_booster)  part final_booster $OTHER_TASKS $BASE align=booster $CHOSEN_BOOSTER method=sft $SEEDS ;;
    sap_booster)    part sap_booster $COMPOSED_TASKS $BASE align=booster $CHOSEN_BOOSTER method=sap $SEEDS ;;
    final_repnoise) part final_repnoise $OTHER_TASKS $BASE align=repnoise $CHOSEN_REPNOISE method=sft $SEEDS ;;
    sap_repnoise)   part sap_repnoise $COMPOSED_TASKS $BASE align=repnoise $CHOSEN_REPNOISE method=sap $SEEDS ;;
    sap_vaccine_classify)  part sap_vaccine_classify data=synthetic_classify $BASE align=vaccine $CHOSEN_VACCINE method=sap $SEEDS ;;
    sap_booster_classify)  part sap_booster_classify data=synthetic_classify $BASE align=booster $CHOSEN_BOOSTER method=sap $SEEDS ;;
    sap_repnoise_classify) part sap_repnoise_classify data=synthetic_classify $BASE align=repnoise $CHOSEN_REPNOISE method=sap $SEEDS ;;
    report)         parts=$(ls -d "$OUT"/*/ | grep -v '/all/$')
                    python -m safeprobe.reporting --no-wandb $parts --out "$OUT/all" > /dev/null
                    python benchmarks/compact_table.py "$OUT/all/summary.csv" harmful_score refusal_rate unusable_rate \
                      refusal_margin fine_tune_accuracy test_loss > "$OUT/all/table.md"
                    python benchmarks/defenses_plot.py "$OUT/all/summary.csv" "$OUT/all/defenses_all.png" \
                      --exclude align.method.rho=10.0 --exclude align.method.lam=5.0 --exclude align.method.alpha=1.0
                    python benchmarks/choose_on_val.py --sft "$OUT/aligned" "$OUT/grid_vaccine" "$OUT/grid_booster" \
                      "$OUT/grid_repnoise" > "$OUT/all/chosen.txt" ;;
    all)            printf '%s\n' grid_vaccine grid_booster grid_repnoise control aligned sap repairs antidote \
                      final_vaccine final_booster final_repnoise sap_vaccine sap_booster sap_repnoise \
                      sap_vaccine_classify sap_booster_classify sap_repnoise_classify \
                      | xargs -P 2 -I{} bash "$0" {}
                    run_part report ;;
    *) echo "unknown part '$1'; see the case list in $0" >&2; exit 2 ;;
  esac
}

for p in "$@"; do run_part "$p"; done
exit  # parsed whole before it runs: editing this file during a sweep cannot change the sweep
