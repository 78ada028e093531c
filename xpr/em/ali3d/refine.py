"""Local refinement of one image's orientation and shift by Nelder–Mead (Yang & Penczek 2008).

For image I with parameters p = (rot, tilt, psi, o_x, o_y) the criterion is the masked correlation
coefficient between the image and the reference projection in the same orientation and shift,

    ccc(p) = Σ_M (P_p − P̄_p)(I − Ī) / √(Σ_M (P_p − P̄_p)² Σ_M (I − Ī)²),

M the disc of radius ou, P_p the central-slice projection (project.py) shifted by o and multiplied
by the CTF weight.  The downhill simplex (scipy.optimize, Nelder–Mead) starts from the current
parameters with steps delta (degrees) on the three angles and ts (pixels) on the two shifts, and
maximises ccc; the best vertex is kept only if it beats the start.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from xpr.em.ali3d import ctf as ctf_model
from xpr.em.ali3d.euler import rotation_matrices
from xpr.em.ali3d.project import Projector


@dataclass
class AlignmentTask:
    projector: Projector       # of the reference of the images' half set
    images: np.ndarray         # (b, n, n) float32 (phase-flipped when that is the CTF mode)
    angles: np.ndarray         # (b, 3) degrees
    shifts_px: np.ndarray      # (b, 2)
    ctf: object                # ctf.CTFParameters of these images, or None
    ctf_mode: str              # none | phase_flip | wiener
    pixel_size_A: float
    mask_radius: float         # ou, pixels
    delta: float               # initial simplex step of the angles, degrees
    ts: float                  # initial simplex step of the shifts, pixels
    max_evaluations: int
    tolerance: float           # simplex size (degrees / pixels) at which it stops


def masked_ccc(projection, normalised_image, mask):
    """ccc of a projection with an image already reduced to zero mean, unit norm inside the mask."""
    p = projection[mask]
    p = p - p.mean()
    norm = np.sqrt(np.dot(p, p))
    return float(np.dot(p, normalised_image) / norm) if norm > 0 else 0.0


def normalise_in_mask(image, mask):
    values = image[mask].astype(np.float64)
    values -= values.mean()
    return values / max(np.sqrt(np.dot(values, values)), 1e-30)


def single_threaded_backend():
    """A CPU backend whose FFTs run on one thread: the criterion transforms one small image at a
    time, where thread start-up costs more than the transform."""
    from xpr.backend import Backend

    return Backend(False, fft_workers=1)


def refine_images(task: AlignmentTask) -> dict:
    """Refine every image of a task (module-level: a parallel.map task). Returns the new parameters,
    the criterion before and after and the number of criterion evaluations per image."""
    backend = single_threaded_backend()
    projector = task.projector
    mask = np.zeros((projector.box, projector.box), dtype=bool)
    axis = np.arange(projector.box) - projector.box // 2
    mask[axis[:, None] ** 2 + axis[None, :] ** 2 <= task.mask_radius ** 2] = True
    steps = np.array([task.delta] * 3 + [task.ts] * 2)
    n = len(task.images)
    angles, shifts = np.array(task.angles, float), np.array(task.shifts_px, float)
    before, after, evaluations = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
    for i in range(n):
        target = normalise_in_mask(task.images[i], mask)
        weight = None
        if task.ctf is not None and task.ctf_mode != "none":
            weight = ctf_model.projection_weight(
                ctf_model.ctf_values(task.ctf, i, projector.kx, projector.ky, task.pixel_size_A, projector.box),
                task.ctf_mode)

        def criterion(p, target=target, weight=weight):
            matrix = rotation_matrices(p[0], p[1], p[2])
            projection = projector.project(matrix, backend, shift_px=p[3:], weight=weight)
            return -masked_ccc(projection, target, mask)

        start = np.concatenate([angles[i], shifts[i]])
        before[i] = -criterion(start)
        simplex = np.vstack([start, start + np.diag(steps)])
        result = minimize(criterion, start, method="Nelder-Mead",
                          options={"initial_simplex": simplex, "maxfev": task.max_evaluations,
                                   "xatol": task.tolerance, "fatol": 1e-6})
        evaluations[i] = result.nfev + 1
        if -result.fun > before[i]:
            angles[i], shifts[i], after[i] = result.x[:3], result.x[3:], -result.fun
        else:
            after[i] = before[i]
    return {"angles": angles, "shifts_px": shifts, "ccc_before": before, "ccc_after": after,
            "evaluations": evaluations}
