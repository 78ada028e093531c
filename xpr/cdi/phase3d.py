"""`xpr cdi phase3d`: phase a 3-D diffraction volume (spipy's phase.phase3d).

The method is shared with phase2d and described in xpr.cdi.phasing; in 3-D the brightest-voxel
shrink-wrap is set by `phasing_parameters.voxel_number`, and the merged density is also written
as vtk/merged_density.vts. Output: phase3d.h5 with `merged/object` of the (padded) volume's shape.
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
    memory.validate_cdi_phase(settings, 3)


def run(settings, archive):
    return phasing.run(settings, archive, dimensions=3)
