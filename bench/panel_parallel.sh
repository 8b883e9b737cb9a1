#!/usr/bin/env bash
# Many panel cells at once on one big machine (e.g. one GPU and 16 cores), inside a deadline.
#
#   bash bench/panel_parallel.sh OUT_DIR DEADLINE_S DEVICE WORKERS PYTHON
#
# The 16 molecules are dealt round-robin to WORKERS processes (2 threads each). Each worker
# runs the phases below in order, one `bench/ab_initio_panel.py` call per phase, into its own
# OUT_DIR/wN.json and OUT_DIR/wN.log (merge them afterwards with `--json`/`--report`). A cell
# is written to its JSON as soon as it is scored, so the cells finished when DEADLINE_S
# passes are kept. If the first phase fails on DEVICE=cuda (a CUDA bug in the engine), the
# worker says so in its log and goes on on the CPU so that the machine's time still yields cells.
# PANEL_PHASES='...;...' and PANEL_MOLECULES='A B' replace the phases and molecules (a tiny check first).
#
# Wall times from such a run belong to that machine, several workers sharing it: keep its
# cells in their own JSON, apart from the 2-core panel (bench/results/ab_initio_panel.json).
set -u
out=$1; deadline=$2; device=$3; workers=$4; python=${5:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
molecules=(${PANEL_MOLECULES:-1A8O 2XHE 4CUP 7CFN 1GBT 9X2O 1QBS 6WG6 4ZHL C3-1K1I 1FKI C4-4CUP 6WQA proc-05 1AFS proc-11})
phases=(
  "--ctf on --snr 0.1 --n 5000 --seeds 2"
  "--ctf on --snr 0.05 --n 5000 --seeds 2"
  "--ctf off --snr 0.1 --n 5000 --seeds 2"
  "--ctf on --snr 0.1 --n 10000 --seeds 1"
)
if [ -n "${PANEL_PHASES:-}" ]; then IFS=';' read -r -a phases <<<"$PANEL_PHASES"; fi  # e.g. a tiny check first

start=$SECONDS
worker() {
  local i=$1 dev=$device mine=() j left
  for ((j = i; j < ${#molecules[@]}; j += workers)); do mine+=("${molecules[j]}"); done
  for phase in "${phases[@]}"; do
    left=$((deadline - (SECONDS - start)))
    [ "$left" -gt 10 ] || break
    echo "== worker $i ($dev, ${left} s left): ${mine[*]}: $phase" >>"$out/w$i.log"
    # shellcheck disable=SC2086
    if ! timeout -s KILL "$left" "$python" "$here/ab_initio_panel.py" $phase --molecules "${mine[@]}" --device "$dev" --threads 2 \
        --n-cache "${PANEL_N_CACHE:-10000}" --json "$out/w$i.json" --work "/tmp/panel-w$i" >>"$out/w$i.log" 2>&1; then
      if [ "$dev" = cuda ] && grep -q Traceback "$out/w$i.log"; then
        echo "== worker $i: FAILED on cuda; going on on the cpu" >>"$out/w$i.log"
        dev=cpu
      fi
    fi
  done
}

for ((i = 0; i < workers; i++)); do
  worker "$i" &
done
wait
echo "done: $(cat "$out"/w*.json 2>/dev/null | grep -c '"molecule"') cells"
