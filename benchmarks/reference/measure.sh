#!/usr/bin/env bash
# Re-measure everything that rests on an embedded model's weights (issue 13), on this machine.
#   bash benchmarks/reference/measure.sh reference            # Fashion-MNIST v2, every step: about 2 hours on 2 cores
#   bash benchmarks/reference/measure.sh digits               # MNIST digits: sizes and eval, about 25 minutes
#   bash benchmarks/reference/measure.sh reference eval bench # only the steps named (sizes, search, eval, sweep, bench)
# Tables go to benchmarks/results/<step>_<model>*.txt, JSON and pictures beside them. Seed 0 everywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-reference}
shift || true
STEPS=${*:-sizes search eval sweep bench}
R=benchmarks/results
PD=.venv/bin/postdiff
W=$(.venv/bin/python -c "from postdiff_lab.builtin_models import REFERENCE_MODELS as M; from postdiff_lab.reference.pipeline import weights_dir; print(weights_dir(M['$MODEL']))")
run() { local out=$1; shift; echo "== $(date -u +%H:%M:%S) $* > $out" >&2; /usr/bin/time -f "(%e s)" "$@" > "$out.tmp" && mv "$out.tmp" "$out"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

# what the model can do at each size (baseline run entirely at 16, 24 and 32 px), N = 1,000
if want sizes; then
  run $R/eval_${MODEL}_sizes.txt $PD eval --model $MODEL --sizes 16,24,32 --samples 1000 --no-progress \
    --json $R/eval_${MODEL}_sizes.json --grid $R/eval_${MODEL}_sizes.png
fi
if [ "$MODEL" = reference ]; then
  # the 0.4-budget search; its recipe ships beside the weights for the demo
  if want search; then
    run $R/search_${MODEL}_0.4.txt $PD plan search --model $MODEL --budget 0.4 -o $R/search_${MODEL}_0.4.recipe.json \
      --json $R/search_${MODEL}_0.4.json
    cp $R/search_${MODEL}_0.4.recipe.json "$W/search-0.4.recipe.json"
  fi
  # every built-in plan, steps:N at matched MACs (4 ~ postdiff, 8 ~ 2x postdiff and the 0.4 search, 12 ~ deepcache
  # and mixed-res, 15 ~ xattn-gate) and the searched plan
  N=2000; PLANS=baseline,steps:4,steps:8,steps:12,steps:15,deepcache,mixed-res,xattn-gate,postdiff,$R/search_${MODEL}_0.4.recipe.json
else
  N=1000; PLANS=baseline,steps:4,steps:8,steps:12,deepcache,mixed-res,postdiff
fi
if want eval; then
  run $R/eval_${MODEL}_${N}.txt $PD eval --model $MODEL --plans $PLANS --samples $N --no-progress \
    --json $R/eval_${MODEL}_${N}.json --grid $R/eval_${MODEL}_grid.png
fi
if [ "$MODEL" = reference ]; then
  # fewer steps against cheaper steps at each budget; 0.33 is the moonshot's (a >= 3x plan on held-out seeds)
  if want sweep; then
    run $R/sweep_${MODEL}.txt $PD sweep --model $MODEL --budgets 0.3,0.33,0.4,0.5,0.6 --json $R/sweep_${MODEL}.json \
      --plot $R/sweep_${MODEL}.png
  fi
  if want bench; then
    run $R/bench_${MODEL}.txt $PD bench --model $MODEL --plans baseline,postdiff \
      --backends torch,onnx,coreml --runs 5 --json $R/bench_${MODEL}.json --grid $R/bench_${MODEL}.png
  fi
fi
echo "measure: done ($MODEL: $STEPS)" >&2
