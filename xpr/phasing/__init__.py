"""The shared iterative-projection phasing engine (used by `cdi phase2d/phase3d`, `fxs reconstruct`).

Pieces, each small and replaceable:

    schedule.py     schedules as data -> a compiled list of Steps (spipy strings, xFrame blocks)
    projections.py  ModulusProjection P_M (masked pixels float, optional background) and
                    SupportProjection P_S (support, positivity, threshold, imaginary-part limit)
    algorithms.py   ER, HIO, RAAR, DM as update rules on P_M and P_S
    shrinkwrap.py   support updates: blurred-amplitude threshold or N brightest voxels
    engine.py       walks the steps over a batch of repeats, records eMod / eCon
    merge.py        select, align (shift, global phase, twin), average, PRTF

A different geometry (fxs's polar/spherical grid) supplies its own P_M and shrink-wrap with the
same call signatures and reuses schedules, algorithms and the engine as they are.
"""
from xpr.phasing.algorithms import ALGORITHMS
from xpr.phasing.engine import History, iterate, random_starts
from xpr.phasing.merge import align, merge_repeats, prtf, real_space_error, select, twin
from xpr.phasing.projections import ModulusProjection, SupportProjection
from xpr.phasing.schedule import Step, compile_schedule, with_periodic_shrink_wrap
from xpr.phasing.shrinkwrap import ShrinkWrap

__all__ = [
    "ALGORITHMS", "History", "iterate", "random_starts", "align", "merge_repeats", "prtf",
    "real_space_error", "select", "twin", "ModulusProjection", "SupportProjection", "Step",
    "compile_schedule", "with_periodic_shrink_wrap", "ShrinkWrap",
]
