#!/usr/bin/env bash
# The synthetic world's evidence (docs/results/synthetic.md): 5 paired seeds per setting.
#   bash benchmarks/synthetic_evidence.sh                 # every part, one after the other
#   bash benchmarks/synthetic_evidence.sh main eps        # some parts (run parts in parallel shells)
#   EVIDENCE_DIR=/somewhere bash benchmarks/synthetic_evidence.sh ...
# Every job evaluates on the test split and, as val/..., on the validation split: settings
# are chosen on val, reported on test. Reports: <part>/summary.md; merged: see the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${EVIDENCE_DIR:-multirun/evidence}
SEEDS=seed=0,1,2,3,4

KERNELS=${KERNELS:-native}  # the published sections ran natively (docs/reproducibility.md)

part() {  # part <name> <overrides...>
  local name=$1; shift
  # probe.refresh_every=1: these sections found SAP's probe every step (the default then)
  python train.py -m "$@" $SEEDS cpu_kernels=$KERNELS probe.refresh_every=1 logger=csv trainer.enable_progress_bar=false \
    hydra.sweep.dir="$OUT/$name"
}

run_part() {
  case $1 in
    main)         part main data=synthetic_instruct,synthetic_classify,synthetic_poison method=sft,sap ;;
    eps)          part eps method=sap probe.eps=0.01,0.05,0.1 ;;              # 0.2 (default) is in main
    harmful_step) part harmful_step method=sap probe.harmful_step=0.01,1.0 ;;  # 0.1 (default) is in main
    layers_early) part layers_early method=sap 'probe.layers=[0,1]' ;;         # [2,3] (default) is in main
    layers_late)  part layers_late method=sap 'probe.layers=[4,5]' ;;
    faithful)     part faithful method=sap probe.mode=faithful ;;
    temperature)  part temperature method=sap probe.temperature=10,100 ;;     # 1 (default) is in main
    contrast)     part contrast method=sap probe.contrast=decision ;;         # sequence (default) is in main
    sft_400)      part sft_400 data=synthetic_instruct method=sft trainer.max_steps=400 ;;  # calibration: twice the budget
    report)       python -m safeprobe.reporting --no-wandb "$OUT/main" "$OUT/eps" "$OUT/harmful_step" \
                    "$OUT/layers_early" "$OUT/layers_late" "$OUT/faithful" "$OUT/temperature" "$OUT/contrast" \
                    --reference "data=synthetic_instruct, method=sft" --out "$OUT/all"
                  python benchmarks/settings_plot.py "$OUT/all/summary.csv" "$OUT/all/settings.png" \
                    --reference "data=synthetic_instruct, method=sft" --skip synthetic_classify synthetic_poison ;;
    *) echo "unknown part '$1'; allowed: main eps harmful_step layers_early layers_late faithful temperature contrast sft_400 report" >&2; exit 2 ;;
  esac
}

main() {
  local parts=("$@")
  [ ${#parts[@]} -eq 0 ] && parts=(main eps harmful_step layers_early layers_late faithful temperature contrast sft_400 report)
  for p in "${parts[@]}"; do run_part "$p"; done
}
main "$@"; exit  # parsed whole before it runs: editing this file during a sweep cannot change the sweep
