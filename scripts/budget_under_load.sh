#!/bin/bash
# Does a time budget hold when the machine slows down mid-run? Runs experiment=cpu_quick under a
# budget; BUSY_AT seconds after its start a busy loop takes one core until the run ends (none
# with BUSY_AT=never). Prints the budget's figures from metrics.json and /usr/bin/time's wall
# clock (docs/experiments.md, "The budget when the machine slows down"):
#
#   CIFAR10_PATH=../shared/data/cifar10-jpeg.tar.gz scripts/budget_under_load.sh [MINUTES] [BUSY_AT]
#
# From the repository root; PY picks the interpreter (default: make install's .venv).
set -euo pipefail
py=${PY:-.venv/bin/python}
command -v "$py" >/dev/null ||
  { echo "budget_under_load.sh: no Python at $py: run make install, or set PY=<python>" >&2; exit 2; }
minutes=${1:-5}
busy_at=${2:-150}
run_dir=$(mktemp -d -t budget_under_load.XXXX)
if [[ $busy_at != never ]]; then
  (sleep "$busy_at" && exec "$py" -c "while True: pass") &
  busy=$!
  trap 'kill $busy 2>/dev/null || true' EXIT  # the busy loop has the subshell's pid (exec)
fi
/usr/bin/time -f "%e s wall clock, %M KB peak" -o "$run_dir/time.txt" \
  "$py" -m resnet_lightning experiment=cpu_quick seed=0 budget.minutes="$minutes" \
  trainer.enable_progress_bar=false hydra.run.dir="$run_dir/run" >"$run_dir/log.txt" 2>&1 ||
  { tail -5 "$run_dir/log.txt"; exit 1; }
"$py" - "$run_dir" "$busy_at" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
m = json.loads((run / "run/metrics.json").read_text())
final_eval = m["budget_used_s"] - m["budget_start_s"] - m["budget_train_s"]
print("| busy loop from | budget | used (metrics.json) | wall clock | drift | reserve kept / used | steps | test acc |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
busy = sys.argv[2] + (" s" if sys.argv[2].isdigit() else "")
print(f"| {busy} | {m['budget_s']:.0f} s | {m['budget_used_s']:.1f} s | "
      f"{(run / 'time.txt').read_text().split(' s ')[0]} s | {m.get('budget_drift', float('nan')):.2f} | "
      f"{m['budget_reserve_s']:.0f} / {final_eval:.0f} s | {m['steps']} | {m['test/acc']:.2%} |")
PY
echo "run directory: $run_dir"
