"""`xpr cdi phase2d`: phase a 2-D diffraction pattern (spipy's phase.phase2d).

The method is shared with phase3d and described in xpr.cdi.phasing: spipy's input preparation,
a loose initial support, a schedule of ER/HIO/DM/RAAR with shrink-wrap on a batch of seeded
repeats, then selection by modulus error, alignment (shift, global phase, twin), averaging and
the PRTF. Output: phase2d.h5 with `merged/object` of the (padded) pattern's shape.
"""
from __future__ import annotations

from xpr import memory
from xpr.cdi import phasing


def validate(settings):
    """Values checked before a run folder exists: the schedule, its beta and shrink-wrap steps;
    whether the pattern can be phased in memory at all (xpr.memory)."""
    phasing.compile_steps(settings)
    phasing.check_ga(settings)
    phasing.check_repeat_thresholds(settings)
    memory.validate_cdi_phase(settings, 2)


def run(settings, archive):
    return phasing.run(settings, archive, dimensions=2)
