#!/usr/bin/env bash
# Runs every workflow's quick tutorial chain in the home $XPR_HOME with the given xpr program.
set -euo pipefail
XPR=${1:-xpr}
: "${XPR_HOME:?set XPR_HOME}"
"$XPR" --setup_home "$XPR_HOME"
chains=(
  "fxs simulate_ccd tutorial extract tutorial reconstruct tutorial average tutorial"
  "cdi simulate tutorial phase2d tutorial"
  "em simulate_4dstem tutorial ptycho tutorial dpc tutorial wdd tutorial tcbf tutorial"
  "em simulate_focal tutorial tie tutorial"
  "em local_ali3d tutorial"
)
for chain in "${chains[@]}"; do
  echo "== xpr $chain"
  start=$SECONDS
  "$XPR" $chain
  echo "   ($((SECONDS - start)) s)"
done
echo
echo "Results are under $XPR_HOME/data/ (one run_N folder per step; the latest-links beside each product)."
