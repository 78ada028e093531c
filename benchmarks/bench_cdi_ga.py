"""Guided repeats (`ga:`) against the defaults at the same total number of iterations.

Cases from the robustness family (benchmarks/bench_cdi_robustness.py generates them: Poisson
counts, a masked beamstop and dead lines) that the defaults find hard: 256^2 `cluster`
(oversampling 4, 1e6 photons, beamstop 8 px) and `polygon` (oversampling 3, 1e6 photons, beamstop
5 px) over several seeds, and 512^2 cases of the issue's class (radius 64 px, 2e6 photons,
beamstop 5 px, real and complex +-1 rad, the true size given as the issue checks it). Each case is phased through the CLI
(8 repeats) with

    defaults   phasing.iters 500HIO 200RAAR 100ER 100ML                          (900 iterations)
    ga3        3 generations of 167HIO 67RAAR 33ER 33ML, bred avg_ab              (900 iterations)
    ga3r       300HIO 100RAAR 50ER 50ML, then 2 generations of 100RAAR 50ER 50ML,
               bred avg_ab (ga.iters: the bred starts refined without HIO)        (900 iterations)
    ga3r_sqrt  as ga3r, bred sqrt_ab (cohere's default)                           (900 iterations)
    ga3e       as ga3r, later generations 150ER 50ML (no RAAR)                    (900 iterations)
    ga3r_none  as ga3r, not bred (the control: the same schedule, each repeat alone) (900 iterations)
    ga5r       260HIO 100RAAR 40ER 40ML, then 4 generations of 75RAAR 20ER 20ML   (900 iterations)

and prints per case and configuration the fraction of the final repeats within real-space error
0.15 of the truth (after shift, global phase and twin), the merged error and the wall time; then
per configuration the mean merged error, the cases merged <= 0.15 and the wall time relative to
the defaults' on the same cases (same process, same load).

    python benchmarks/bench_cdi_ga.py                         # 256^2 cases, seeds 1-3
    python benchmarks/bench_cdi_ga.py --large 0 1 2 3         # also the 512^2 cases (seeds 6, 8 real; 7, 9 complex)
    python benchmarks/bench_cdi_ga.py --large 0 --large-only --configs defaults ga3r
    python benchmarks/bench_cdi_ga.py --3d --large-only --configs defaults ga3r   # 3-D 64^3 only
    python benchmarks/bench_cdi_ga.py --configs defaults ga3 --seeds 1 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cdi_robustness import GOOD, Case, run_case, run_cli  # noqa: E402

CONFIGS = {
    "defaults": [],
    # the default schedule cut in three; every generation the same
    "ga3": ["ga.generations=3", "ga.breed=avg_ab", "phasing.iters=167HIO 67RAAR 33ER 33ML"],
    # a shorter first generation, then two refinements of the bred starts without HIO
    "ga3r": ["ga.generations=3", "ga.breed=avg_ab", "phasing.iters=300HIO 100RAAR 50ER 50ML",
             "ga.iters=100RAAR 50ER 50ML"],
    "ga3r_sqrt": ["ga.generations=3", "ga.breed=sqrt_ab", "phasing.iters=300HIO 100RAAR 50ER 50ML",
                  "ga.iters=100RAAR 50ER 50ML"],
    # as ga3r, the bred starts refined by ER and ML only (no RAAR to walk them away)
    "ga3e": ["ga.generations=3", "ga.breed=avg_ab", "phasing.iters=300HIO 100RAAR 50ER 50ML",
             "ga.iters=150ER 50ML"],
    # the control: ga3r's schedule and restarts without breeding (each repeat continues alone)
    "ga3r_none": ["ga.generations=3", "ga.breed=none", "phasing.iters=300HIO 100RAAR 50ER 50ML",
                  "ga.iters=100RAAR 50ER 50ML"],
    "ga5r": ["ga.generations=5", "ga.breed=avg_ab", "phasing.iters=260HIO 100RAAR 40ER 40ML",
             "ga.iters=75RAAR 20ER 20ML"],
}


#: the issue's 512^2 class as bench_cdi_robustness.py --issue builds it (textured): (seed, phase)
LARGE = [(6, 0.0), (8, 0.0), (7, 1.0), (9, 1.0)]


def cases(seeds, large, three_d=False):
    """(case, give the true size) pairs; large: indices into LARGE."""
    out = []
    for seed in seeds:
        out.append((Case("cluster", photons=1e6, beamstop=8, seed=seed), False))
        out.append((Case("polygon", photons=1e6, oversampling=3, beamstop=5, seed=seed + 2), False))
    if three_d:     # the quick family's 3-D case (phase3d)
        out.append((Case("random_smooth", n=64, dim=3, oversampling=4, photons=2e7, beamstop=3), False))
    for index in large:
        seed, phase = LARGE[index]
        out.append((Case("random_smooth", n=512, oversampling=4, photons=2e6, beamstop=5, seed=seed,
                         phase=phase), True))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--configs", nargs="*", default=["defaults", "ga3", "ga3r", "ga5r"], choices=list(CONFIGS))
    parser.add_argument("--large", nargs="*", type=int, default=[],
                        help="also these 512^2 issue-class cases (indices into LARGE; minutes per run)")
    parser.add_argument("--3d", dest="three_d", action="store_true", help="also 3-D 64^3 (phase3d)")
    parser.add_argument("--large-only", action="store_true", help="only the 512^2 (--large) and 3-D (--3d) cases")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a settings override KEY=VALUE passed to every run (repeatable)")
    args = parser.parse_args()
    chosen = cases(args.seeds, args.large, args.three_d)
    if args.large_only:
        chosen = [c for c in chosen if c[0].n == 512 or c[0].dim == 3]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ["XPR_BENCH_TMP"] = tmp
        os.environ["HOME"] = tmp                 # --setup_home records its home in ~/.xpr: not the user's
        run_cli(["--setup_home", home])
        os.environ["XPR_HOME"] = str(home)
        print(f"{'case':<52} {'config':<9} {'good':>6} {'merged':>7} {'wall':>7}  repeats")
        table = {name: [] for name in args.configs}
        for case, with_size in chosen:
            for name in args.configs:
                r = run_case(case, tmp, list(CONFIGS[name]) + args.overrides, support_size=with_size)
                table[name].append(r)
                label = case.label + (" size" if with_size else "")
                print(f"{label:<52} {name:<9} {np.mean(r['errors'] <= GOOD):6.2f} {r['merged']:7.3f} "
                      f"{r['wall']:6.1f}s  {np.array2string(np.sort(r['errors']), precision=3)}", flush=True)
        base = table.get("defaults")
        print()
        for name, rows in table.items():
            merged = np.array([r["merged"] for r in rows])
            wall = np.array([r["wall"] for r in rows])
            relative = "" if base is None else \
                f"; wall {np.sum(wall) / np.sum([r['wall'] for r in base]):.2f}x the defaults'"
            print(f"{name:<9} mean merged {merged.mean():.3f} (median {np.median(merged):.3f}); "
                  f"{int(np.sum(merged <= GOOD))} of {len(rows)} cases <= {GOOD}; good repeats "
                  f"{np.mean([np.mean(r['errors'] <= GOOD) for r in rows]):.2f}{relative}")


if __name__ == "__main__":
    main()
