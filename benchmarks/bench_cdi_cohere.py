"""xpr's `cdi phase2d/phase3d` defaults side by side with cohere on the same noisy, masked cases.

cohere (cohere-core on PyPI, Argonne's CDI phasing library) is what many of xpr's CDI users run
today. This script hands both the same pattern from bench_cdi_robustness.py's family:

* xpr: the real CLI, a settings file with only the data and mask paths (and, with
  --support-size, the true object's size), exactly as bench_cdi_robustness.py runs it;
* cohere: its `Rec` engine on numpy, configured as its documented example configuration does
  (ER/HIO cycles with Gaussian shrink-wrap every iteration, threshold 0.1, sigma 1; initial
  support a box of half the array), the same number of repeats with seeded random starts, fed
  sqrt(pattern) as cohere's preprocessing does. cohere has no detector mask: masked pixels are
  zero, as its alien and beamstop removal leaves them. For fairness it also phases the same
  Poisson pattern with nothing masked (no beamstop, no dead lines), which xpr never gets.

Per case it prints each program's fraction of repeats within real-space error 0.15 of the truth
(after translation, global phase and twin removal: xpr.phasing.merge.real_space_error), the result
a user gets (xpr: the merged object; cohere: the repeat with the lowest final error, cohere's own
choice in its GA) and the wall time of each.

cohere needs numpy >= 2 and Python >= 3.11; install it beside xpr in a separate environment:

    python -m venv /tmp/cohere_venv && /tmp/cohere_venv/bin/pip install -e '.[bench-cdi]'
    /tmp/cohere_venv/bin/python benchmarks/bench_cdi_cohere.py            # the 2-D cases of --quick
    /tmp/cohere_venv/bin/python benchmarks/bench_cdi_cohere.py --only 0 2 --repeats 4
    /tmp/cohere_venv/bin/python benchmarks/bench_cdi_cohere.py --family 31 172 302 304   # the failures
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cdi_robustness import GOOD, bench_home, full_family, make_case, quick_family, run_case  # noqa: E402

#: cohere's example reconstruction configuration (config_rec of its documentation), 620 iterations
COHERE_PARAMETERS = {
    "algorithm_sequence": "3* (20*ER + 180*HIO) + 20*ER",
    "hio_beta": 0.9,
    "shrink_wrap_trigger": [1, 1],
    "shrink_wrap_type": "GAUSS",
    "shrink_wrap_threshold": 0.1,
    "shrink_wrap_gauss_sigma": 1.0,
    "initial_support_area": [0.5, 0.5, 0.5],
}


def run_cohere(pattern, truth, folder, repeats):
    """(errors of the repeats, error of the lowest-chi repeat, wall s) of cohere on one pattern."""
    import cohere_core.controller.phasing as cohere_phasing

    from xpr.backend import cpu
    from xpr.phasing.merge import real_space_error

    data_file = Path(folder) / "cohere_data.npy"
    np.save(data_file, np.sqrt(np.maximum(pattern, 0)).astype(np.float32))
    errors, chis = [], []
    start = time.perf_counter()
    for repeat in range(repeats):
        np.random.seed(repeat)
        parameters = dict(COHERE_PARAMETERS)
        if pattern.ndim == 3:
            parameters["twin_trigger"] = [2]
        with contextlib.redirect_stdout(io.StringIO()):       # cohere prints every step
            worker = cohere_phasing.create_rec(parameters, str(data_file), "np", -1, debug=True)
            worker.iterate()
        errors.append(real_space_error(np.asarray(worker.ds_image), truth, cpu()))
        chis.append(worker.errs[-1])
    wall = time.perf_counter() - start
    return np.array(errors), errors[int(np.argmin(chis))], wall


def unmasked_pattern(case, truth):
    """The case's Poisson pattern (the same draw as make_case) before the beamstop and dead lines."""
    from xpr.cdi.objects import far_field_intensity
    from xpr.cdi.simulate import record

    return record(far_field_intensity(truth), case.photons, seed=case.seed + 1000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", type=int, help="indices of the 2-D cases of --quick to run")
    parser.add_argument("--repeats", type=int, default=8, help="repeats of each program (xpr's default: 8)")
    parser.add_argument("--family", nargs="*", type=int,
                        help="instead, these indices of bench_cdi_robustness.py's full family (2-D)")
    parser.add_argument("--support-size", action="store_true",
                        help="give xpr the true object's size (cohere has no such setting)")
    args = parser.parse_args()
    cases = [c for c in quick_family() if c.dim == 2 and c.photons >= 1e6]
    if args.only:
        cases = [cases[i] for i in args.only]
    if args.family:
        cases = [full_family()[i] for i in args.family]
    with bench_home() as tmp:
        print(f"{'case':<52} {'xpr good':>8} {'merged':>7} {'wall':>7} | {'cohere good':>11} "
              f"{'best-chi':>8} {'wall':>7} | unmasked: {'good':>5} {'best-chi':>8}")
        for case in cases:
            pattern, _, truth = make_case(case)
            overrides = [f"phasing.repeats={args.repeats}"]
            ours = run_case(case, tmp, overrides, support_size=args.support_size)
            errors, chosen, wall = run_cohere(pattern, truth, tmp, args.repeats)
            unmasked = unmasked_pattern(case, truth)
            errors_unmasked, chosen_unmasked, _ = run_cohere(unmasked, truth, tmp, args.repeats)
            print(f"{case.label:<52} {np.mean(ours['errors'] <= GOOD):8.2f} {ours['merged']:7.3f} "
                  f"{ours['wall']:6.1f}s | {np.mean(errors <= GOOD):11.2f} {chosen:8.3f} {wall:6.1f}s | "
                  f"{'':>9} {np.mean(errors_unmasked <= GOOD):5.2f} {chosen_unmasked:8.3f}", flush=True)


if __name__ == "__main__":
    main()
