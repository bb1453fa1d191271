#!/usr/bin/env bash
# The section "## Method comparison (fewstep bench)" of docs/BENCHMARKS.md: three teachers
# (moons, the exact 8-mode ring, 8x8 digits), the moons students, `fewstep bench` on each, then
# bench/make_benchmarks_md.py. About 30 minutes on 2 cores. Run from the repository root:
#
#     bash bench/method_comparison.sh            # writes runs/bench-docs/ and the section
#
# Every step is resumable: a finished run folder is kept and not trained again.
set -euo pipefail
PY=${PY:-.venv/bin/python}
FS=${FS:-.venv/bin/fewstep}
R=runs/bench-docs
mkdir -p "$R/students"

run() {  # run OUT CMD...: CMD unless OUT already holds a finished run (its model.json)
  local out=$1; shift
  if [ -f "$out/model.json" ]; then echo "kept $out"; else "$@"; fi
}

run $R/moons-teacher $FS train --data moons --steps 3000 --out $R/moons-teacher --quiet
run $R/students/cd $FS distill consistency --teacher $R/moons-teacher --steps 1500 --schedule constant --mu 0.95 \
  --loss l2 --weighting uniform --levels uniform --sigma-max 80.0 --out $R/students/cd --quiet
run $R/students/kd $FS distill knowledge --teacher $R/moons-teacher --steps 1500 --pair-nfe 32 --pairs 4000 \
  --out $R/students/kd --quiet
run $R/students/pd $FS distill progressive --teacher $R/moons-teacher --steps 600 --start-steps 16 \
  --out $R/students/pd --quiet
run $R/digits-teacher $FS train --data digits --batch-size 128 --out $R/digits-teacher --quiet
$PY -c "from fewstep.data.gmm import GaussianMixture as G; G.ring(8, radius=2.0, std=0.25).save('$R/ring8.npz')"

rm -rf $R/moons $R/ring8 $R/digits
$FS bench --teacher $R/moons-teacher --out $R/moons --quiet
$FS bench --teacher gmm:$R/ring8.npz --nfe 1,2,4,8,16 --out $R/ring8 --quiet
$FS bench --teacher $R/digits-teacher --out $R/digits --quiet
$PY bench/make_benchmarks_md.py $R/moons/results.json $R/ring8/results.json $R/digits/results.json \
  --doc docs/BENCHMARKS.md
