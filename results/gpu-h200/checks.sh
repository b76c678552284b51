#!/bin/bash
# GPU checks, one prepared script: environment, check, quick suite twice (determinism), bench, plan.
# Every step has its own time limit; everything is packed into $OUT/gpu.tgz at the end.
export PYTHONUNBUFFERED=1
W=/tmp/gpu; mkdir -p $W; L=$W/logs; mkdir -p $L
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
S=${SCALE:-1}   # SCALE<1 shrinks every limit for a dry run
lim() { python3 -c "print(max(5,int($1*$S)))"; }
{ nvidia-smi; python3 -c "import torch,sys;print(sys.version);print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"; nproc; free -g; } > $L/env.txt 2>&1
if ! python3 -c "import kornia" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> $L/env.txt 2>&1 && export PYTHONPATH=/tmp/site
fi
python3 -c "import kornia; print('kornia', kornia.__version__)" >> $L/env.txt 2>&1
el env done; cat $L/env.txt | head -30
DEV=${DEV:-cuda}
[ -n "$SKIP_CHECK" ] || { el check; timeout $(lim 80) python3 run.py check --device $DEV > $L/check.txt 2>&1; echo "rc $?" >> $L/check.txt; cat $L/check.txt; }
# the quick suite twice, at the same time, each split over 6 one-thread processes sharing the GPU (a cell locked by
# one process is skipped by the others)
el quick x2
for r in A B; do for i in 1 2 3 4 5 6; do
  timeout $(lim 240) python3 run.py --threads 1 run --suite quick $QUICK_ARGS --device $DEV --run-root $W/quick-$r --results-root $W/results-$r > $L/quick-$r-$i.txt 2>&1 &
done; done; wait
el quick done
for r in A B; do timeout 60 python3 run.py status --suite quick --run-root $W/quick-$r > $L/status-$r.txt 2>&1; tail -3 $L/status-$r.txt; done
python3 - $W > $L/determinism.txt 2>&1 <<'PY'
import json, pathlib, sys, torch
w = pathlib.Path(sys.argv[1])
rec = lambda r: {p.stem: json.loads(p.read_text()) for p in (w / f"quick-{r}/quick/records").glob("*.json")}
a, b = rec("A"), rec("B")
same = differ = sets_equal = 0
for k in sorted(set(a) & set(b)):
    pa, pb = a[k]["accuracy"]["accuracies"], b[k]["accuracy"]["accuracies"]
    sa, sb = (w / f"quick-{r}/quick/sets/{k}.pt" for r in "AB")
    seq = ""
    if sa.exists() and sb.exists():
        ta, tb = (torch.load(p, map_location="cpu", weights_only=False) for p in (sa, sb))
        xa = ta["images"]
        xb = tb["images"]
        if xa is not None:
            eqs = torch.equal(xa, xb); sets_equal += eqs
            seq = f"set bitwise {'equal' if eqs else 'differs, max abs diff %.3g' % (xa.float() - xb.float()).abs().max()}"
        else:
            seq = f"set type {type(ta).__name__}"
    eq = pa == pb
    same += eq; differ += not eq
    print(("same  " if eq else "DIFF  ") + k, [round(100 * x, 2) for x in pa], "" if eq else [round(100 * x, 2) for x in pb], seq)
print(f"{same} cells identical accuracies, {differ} differ, {sets_equal} sets bitwise equal, "
      f"{len(set(a) ^ set(b))} cells in one run only")
PY
tail -1 $L/determinism.txt
el bench; timeout $(lim 130) python3 run.py bench --quick --device $DEV --sections peak,iterations,explicit,evaluation,memory --out $W/bench > $L/bench.txt 2>&1; echo "rc $?" >> $L/bench.txt; tail -5 $L/bench.txt
el plan; timeout $(lim 80) python3 run.py plan --suite quick --all --device $DEV --run-root $W/quick-A > $L/plan.txt 2>&1; echo "rc $?" >> $L/plan.txt; tail -8 $L/plan.txt
el pack; tar czf $OUT/gpu.tgz -C $W --exclude='*/checkpoints/*' logs quick-A quick-B results-A results-B bench 2>/dev/null; ls -la $OUT; el end
