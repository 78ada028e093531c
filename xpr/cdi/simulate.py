"""`xpr cdi simulate`: a model object and the diffraction pattern a detector records of it.

1. A model object (xpr.cdi.objects) of diameter shape/oversampling pixels is centred in a grid of
   the detector's shape (2-D frame or 3-D volume).
2. Its far-field intensity I(q) = |FT[rho](q)|^2 is put on the detector with zero frequency at
   the centre.
3. With a photon count N, the intensities are scaled to N expected photons in total and replaced
   by Poisson draws; without one they stay noise-free.
4. A beamstop (a disc/ball of given radius at the centre) and a cross of detector gaps block
   pixels: they are recorded as 0 and flagged in the mask (1 = masked, as spipy).

Writes simulate.h5 (the latest-link `simulate/<structure_name>.h5`) with `data` (the pattern),
`mask`, `truth/object` and `truth/support`, and PNGs of the pattern and the object.
"""
from __future__ import annotations

import numpy as np

from xpr import memory, plot
from xpr.cdi.objects import far_field_intensity, model_object
from xpr.phasing.projections import centred_radius


def detector_mask(shape, beamstop_radius=0.0, gap_width=0, gap_offset=0):
    """True where the detector records nothing: a central beamstop and a cross of gaps."""
    masked = np.asarray(centred_radius(shape)) <= beamstop_radius if beamstop_radius else \
        np.zeros(shape, dtype=bool)
    if gap_width:
        for axis, n in enumerate(shape):
            start = n // 2 + int(gap_offset) - int(gap_width) // 2
            index = [slice(None)] * len(shape)
            index[axis] = slice(max(start, 0), max(start + int(gap_width), 0))
            masked[tuple(index)] = True
    return masked


def record(intensity, photons=None, seed=0):
    """Expected intensities scaled to `photons` in total and Poisson-sampled (None: unchanged)."""
    if photons is None:
        return intensity.astype(np.float64)
    expected = intensity * (float(photons) / max(float(intensity.sum()), 1e-300))
    return np.random.default_rng(seed).poisson(expected).astype(np.float64)


def run(settings, archive):
    dimensions = int(settings.dimensions)
    shape = (int(settings.shape),) * dimensions
    obj = settings.object
    memory.plan_cdi_simulate(shape, complex_object=bool(obj.max_phase), log=archive.log)
    diameter = shape[0] / float(obj.oversampling)
    truth = model_object(obj.kind, shape, diameter, seed=int(obj.seed),
                         correlation_length=float(obj.correlation_length),
                         max_phase=float(obj.max_phase))
    archive.log.info("model %s object, diameter %.1f px in a %s grid (oversampling %.2f)",
                     obj.kind, diameter, "x".join(map(str, shape)), float(obj.oversampling))

    det = settings.detector
    pattern = record(far_field_intensity(truth), det.photons, seed=int(det.seed))
    masked = detector_mask(shape, float(det.beamstop_radius), int(det.gap_width),
                           int(det.gap_offset))
    pattern[masked] = 0.0
    archive.log.info("pattern: %.3g photons recorded, %d of %d pixels masked",
                     pattern.sum(), int(masked.sum()), masked.size)

    archive.save_h5("simulate.h5", {
        "data": pattern.astype(np.float32),
        "mask": masked.astype(np.uint8),
        "truth": {"object": truth.astype(np.complex64 if np.iscomplexobj(truth) else np.float32),
                  "support": (np.abs(truth) > 0).astype(np.uint8)},
    }, main=True, attrs={"dimensions": dimensions, "oversampling": float(obj.oversampling),
                         "mask_convention": "1 = masked / unmeasured"})
    _figures(archive, pattern, masked, truth)
    return {"data": pattern, "mask": masked, "truth": truth}


def _central_slice(a):
    return a if a.ndim == 2 else a[a.shape[0] // 2]


def _figures(archive, pattern, masked, truth):
    fig, axes = plot.figure(1, 3)
    shown = np.where(_central_slice(masked), np.nan, np.log10(_central_slice(pattern) + 1.0))
    plot.image(axes[0], shown, "log10(I + 1)")
    plot.image(axes[1], np.abs(_central_slice(truth)), "object amplitude")
    plot.image(axes[2], np.angle(_central_slice(truth)), "object phase", cmap="twilight")
    archive.savefig(fig, "simulate.png")
