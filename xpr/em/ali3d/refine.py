"""Local refinement of the images' orientations and shifts by Nelder–Mead (Yang & Penczek 2008),
all images of a task at once.

For image I with parameters p = (rot, tilt, psi, o_x, o_y) the criterion is the masked correlation
coefficient between the image and the reference projection in the same orientation and shift,

    ccc(p) = Σ_M (P_p − P̄_p)(I − Ī) / √(Σ_M (P_p − P̄_p)² Σ_M (I − Ī)²),

M the disc of radius ou, P_p the central-slice projection (project.py) shifted by o and multiplied
by the CTF weight.  The downhill simplex (Nelder–Mead with the standard coefficients 1, 2, ½, ½ and
scipy's stopping rule) starts from the current parameters with steps delta (degrees) on the three
angles and ts (pixels) on the two shifts, and maximises ccc.  Every image of a task has its own
simplex, but each step's evaluations of all of them — the central slices gathered with the
gridding kernel, the phase ramps, the inverse transforms and the masked correlations — are made
together as array operations (`batched_nelder_mead`, `BatchedCriterion`): the per-evaluation
Python overhead that dominated one-image-at-a-time searches of small images is paid once per
simplex step.  The best vertex is kept only if it beats the start.

Options (BatchedCriterion): `least_squares` replaces the ccc by 1 − ‖I′ − P′‖²/‖I′‖² (the
projection's scale fixed at 1), and with it `sigma_angle` adds a Gaussian prior on the rotation
away from the start, θ²/2σ², to the likelihood ‖I′ − P′‖²/2σ²_noise (RELION's local-search
sigma_ang).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.em.ali3d import ctf as ctf_model
from xpr.em.ali3d.euler import rotation_angle_deg, rotation_matrices
from xpr.em.ali3d.project import Projector, gridded_slices, nufft_slices


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
    criterion: str = "ccc"     # ccc | least_squares (see BatchedCriterion)
    sigma_angle: float = 0.0   # least_squares: σ (degrees) of a Gaussian prior on the rotation from the start; 0 = none


def masked_ccc(projection, normalised_image, mask):
    """ccc of a projection with an image already reduced to zero mean, unit norm inside the mask
    (the real-space form of the criterion, for checks)."""
    p = projection[mask]
    p = p - p.mean()
    norm = np.sqrt(np.dot(p, p))
    return float(np.dot(p, normalised_image) / norm) if norm > 0 else 0.0


def normalise_in_mask(image, mask):
    values = image[mask].astype(np.float64)
    values -= values.mean()
    return values / max(np.sqrt(np.dot(values, values)), 1e-30)


def disc_mask(box: int, radius: float):
    axis = np.arange(box) - box // 2
    return axis[:, None] ** 2 + axis[None, :] ** 2 <= radius ** 2


class BatchedCriterion:
    """−ccc of many (image, parameters) pairs at once (see the module docstring).

    With criterion `least_squares` the value is instead −(‖I′‖² − ‖I′ − P′‖²)/‖I′‖², I′ and P′ the
    image and the projection less their means inside the mask: the white-noise likelihood with the
    projection's scale fixed at 1 (the reference is reconstructed from the same images, so it has
    their scale) instead of fitted at every evaluation as the ccc implicitly does.

    The shift's phase exp(−2πi k·(o + c)/n) is the product of a kx and a ky factor, each made on
    the box's integer frequencies and gathered (no complex exponential per slice point)."""

    def __init__(self, projector: Projector, images, mask, ctf=None, ctf_mode="none", pixel_size_A=1.0,
                 batch_points=400_000, criterion="ccc"):
        if criterion not in ("ccc", "least_squares"):
            raise ValueError(f"criterion {criterion!r}: ccc or least_squares")
        self.projector = projector
        self.mask = mask
        self.criterion = criterion
        self.prior = None               # least_squares + sigma_angle: (start rotations, likelihood scale, σ°)
        box = projector.box
        self.target = np.stack([normalise_in_mask(image, mask) for image in images])
        inside = np.asarray(images)[:, mask].astype(np.float64)
        self.image_norm = np.maximum(np.linalg.norm(inside - inside.mean(axis=1, keepdims=True), axis=1), 1e-30)
        self.ctf_weight = None
        if ctf is not None and ctf_mode != "none":
            self.ctf_weight = np.stack([ctf_model.projection_weight(
                ctf_model.ctf_values(ctf, i, projector.kx, projector.ky, pixel_size_A, box), ctf_mode)
                for i in range(len(images))]).astype(np.float32)
        self.centre = box // 2
        self.kx_index = projector.kx.astype(np.int64)                                   # 0 … n/2
        self.ky_index = projector.ky.astype(np.int64) % box                              # numpy order
        self.batch = max(1, batch_points // max(1, len(projector.kx)))
        self.columns = int(projector.cols.max()) + 1 if len(projector.cols) else 1
        self.plan = projector.nufft_plan() if projector.method == "nufft" else None   # this search's own

    def __call__(self, which, parameters):
        """−ccc of images `which` (indices into the task) at `parameters` (len(which), 5)."""
        out = np.empty(len(which))
        for start in range(0, len(which), self.batch):
            part = slice(start, start + self.batch)
            out[part] = self._evaluate(np.asarray(which)[part], np.asarray(parameters)[part])
        return out

    def spectra(self, which, parameters):
        """P̂ of images `which` at `parameters`: (b, m) complex64 at the slice points, shifted and
        CTF-weighted."""
        p = self.projector
        matrices = rotation_matrices(parameters[:, 0], parameters[:, 1], parameters[:, 2])
        values = slices(p, matrices, plan=self.plan)                                # (b, m)
        box = p.box
        x = np.exp((-2j * np.pi / box) * np.arange(box // 2 + 1)[None, :] * (parameters[:, 3:4] + self.centre))
        frequencies = np.fft.fftfreq(box, 1.0 / box)[None, :]
        y = np.exp((-2j * np.pi / box) * frequencies * (parameters[:, 4:5] + self.centre))
        rows = np.arange(len(which))[:, None]
        values = values * (x[rows, self.kx_index] * y[rows, self.ky_index]).astype(np.complex64)
        if self.ctf_weight is not None:
            values = values * self.ctf_weight[which]
        return values

    def projections(self, which, parameters):
        """The projections (b, n, n), shifted and CTF-weighted, of images `which` at `parameters`."""
        p = self.projector
        # only the columns kx ≤ radius hold values: the ky transforms of the others are skipped
        # (irfft pads the missing columns with zeros: the same result as irfft2 of the full array)
        spectrum = np.zeros((len(which), p.box, self.columns), dtype=np.complex64)
        spectrum[:, p.rows, p.cols] = self.spectra(which, parameters)
        return np.fft.irfft(np.fft.ifft(spectrum, axis=-2), n=p.box, axis=-1)

    def _evaluate(self, which, parameters):
        inside = self.projections(which, parameters)[:, self.mask].astype(np.float64)
        inside -= inside.mean(axis=1, keepdims=True)
        if self.criterion == "least_squares":
            # ‖I′‖² − ‖I′ − P′‖² = 2⟨P′, I′⟩ − ‖P′‖², with I′ = ‖I′‖ · target
            norm_i = self.image_norm[which]
            cross = np.einsum("bi,bi->b", inside, self.target[which]) / norm_i
            value = -(2.0 * cross - np.einsum("bi,bi->b", inside, inside) / norm_i ** 2)
            if self.prior is not None:
                start, scale, sigma = self.prior
                relative = np.einsum("bij,bkj->bik", rotation_matrices(*parameters[:, :3].T), start[which])
                value = scale[which] * value + 0.5 * (rotation_angle_deg(relative) / sigma) ** 2
            return value
        norm = np.sqrt(np.einsum("bi,bi->b", inside, inside))
        return -np.einsum("bi,bi->b", inside, self.target[which]) / np.maximum(norm, 1e-30)


def slices(projector: Projector, matrices, keep=None, plan=None):
    """V̂ on the central slices of many orientations (b, 3, 3): complex64 (b, m) at the projector's
    slice points (those selected by `keep`), with the W³ gridding kernel (as Projector.slice) or,
    for a `nufft` projector, by ducc0's NUFFT (project.nufft_slices; plan: its nufft_plan())."""
    frequencies = projector.frequencies if keep is None else projector.frequencies[:, keep]
    if projector.method == "nufft":
        return nufft_slices(projector, matrices, frequencies, plan)
    rows = np.asarray(matrices, dtype=np.float64)[:, :2, :] * float(projector.npad)     # (b, 2, 3)
    coordinates = np.einsum("bji,jm->bim", rows, frequencies) + projector.half          # (b, 3, m)
    return gridded_slices(projector, coordinates)


def batched_nelder_mead(function, starts, steps, max_evaluations, xatol, fatol=1e-6):
    """Minimise function(which, points) -> values for many independent problems at once.

    starts (b, d); steps (d,): the initial simplex is the start and the start plus each step.
    Standard Nelder–Mead (reflection 1, expansion 2, contraction ½, shrink ½; scipy's
    stopping rule: every vertex within xatol of the best in every coordinate and every value
    within fatol of the best, or max_evaluations). Returns (best points, best values,
    evaluations per problem)."""
    starts = np.asarray(starts, dtype=np.float64)
    b, d = starts.shape
    simplex = np.repeat(starts[:, None, :], d + 1, axis=1)
    simplex[:, 1:, :] += np.diag(np.asarray(steps, dtype=np.float64))[None]
    all_problems = np.arange(b)
    values = function(np.repeat(all_problems, d + 1), simplex.reshape(-1, d)).reshape(b, d + 1)
    evaluations = np.full(b, d + 1)
    active = np.ones(b, dtype=bool)
    while True:
        order = np.argsort(values, axis=1)
        simplex = np.take_along_axis(simplex, order[..., None], axis=1)
        values = np.take_along_axis(values, order, axis=1)
        size = np.abs(simplex[:, 1:] - simplex[:, :1]).max(axis=(1, 2))
        spread = np.abs(values[:, 1:] - values[:, :1]).max(axis=1)
        active &= ~(((size <= xatol) & (spread <= fatol)) | (evaluations >= max_evaluations))
        idx = np.nonzero(active)[0]
        if len(idx) == 0:
            break
        centroid = simplex[idx, :-1].mean(axis=1)
        worst = simplex[idx, -1]
        reflected = 2.0 * centroid - worst
        f_reflected = function(idx, reflected)
        evaluations[idx] += 1
        best, second, worst_value = values[idx, 0], values[idx, -2], values[idx, -1]
        new_point, new_value = reflected.copy(), f_reflected.copy()
        shrink = np.zeros(len(idx), dtype=bool)
        expand = f_reflected < best
        if expand.any():
            e = np.nonzero(expand)[0]
            expanded = 3.0 * centroid[e] - 2.0 * worst[e]
            f_expanded = function(idx[e], expanded)
            evaluations[idx[e]] += 1
            better = f_expanded < f_reflected[e]
            new_point[e[better]], new_value[e[better]] = expanded[better], f_expanded[better]
        outside = (f_reflected >= second) & (f_reflected < worst_value)
        if outside.any():
            o = np.nonzero(outside)[0]
            contracted = 1.5 * centroid[o] - 0.5 * worst[o]
            f_contracted = function(idx[o], contracted)
            evaluations[idx[o]] += 1
            good = f_contracted <= f_reflected[o]
            new_point[o[good]], new_value[o[good]] = contracted[good], f_contracted[good]
            shrink[o[~good]] = True
        inside = f_reflected >= worst_value
        if inside.any():
            i = np.nonzero(inside)[0]
            contracted = 0.5 * centroid[i] + 0.5 * worst[i]
            f_contracted = function(idx[i], contracted)
            evaluations[idx[i]] += 1
            good = f_contracted < worst_value[i]
            new_point[i[good]], new_value[i[good]] = contracted[good], f_contracted[good]
            shrink[i[~good]] = True
        replace = idx[~shrink]
        simplex[replace, -1], values[replace, -1] = new_point[~shrink], new_value[~shrink]
        if shrink.any():
            s = idx[shrink]
            simplex[s, 1:] = simplex[s, :1] + 0.5 * (simplex[s, 1:] - simplex[s, :1])
            values[s, 1:] = function(np.repeat(s, d), simplex[s, 1:].reshape(-1, d)).reshape(len(s), d)
            evaluations[s] += d
    return simplex[:, 0].copy(), values[:, 0].copy(), evaluations


# The simplex's value tolerance when it minimises −log posterior (least_squares with sigma_angle):
# the values are then log-likelihood units (thousands for a 64² image), where the 1e-6 of the
# normalised criteria was never met and every search ran to max_evaluations (201.6 evaluations per
# image on the benchmark).  A log-posterior difference of 0.01 (a probability ratio of 1.01) is far
# below what separates two orientations: 500 × 64², SNR 1, one pass, 201.6 → 146 evaluations per
# image with the same errors (docs/local_ali3d.md).
POSTERIOR_FATOL = 0.01


def refine_images(task: AlignmentTask) -> dict:
    """Refine every image of a task (module-level: a parallel.map task). Returns the new parameters,
    the criterion before and after (ccc, or with least_squares 1 − ‖I′ − P′‖²/‖I′‖²) and the number of criterion evaluations per image."""
    projector = task.projector
    mask = disc_mask(projector.box, task.mask_radius)
    criterion = BatchedCriterion(projector, task.images, mask, task.ctf, task.ctf_mode, task.pixel_size_A,
                                 criterion=task.criterion)
    n = len(task.images)
    everyone = np.arange(n)
    start = np.concatenate([np.asarray(task.angles, float), np.asarray(task.shifts_px, float)], axis=1)
    before = -criterion(everyone, start)
    if task.sigma_angle > 0 and task.criterion == "least_squares":
        # −log posterior: ‖I′ − P′‖²/2σ² + θ²/2σ_a², θ the rotation from the start (RELION's local
        # searches' sigma_ang); the noise variance σ² per pixel from the residual at the start
        residual = criterion.image_norm ** 2 * (1.0 - before)
        noise = np.maximum(residual / max(int(mask.sum()) - 1, 1), 1e-30)
        criterion.prior = (rotation_matrices(*start[:, :3].T), criterion.image_norm ** 2 / (2.0 * noise),
                           float(task.sigma_angle))
        before = -criterion(everyone, start)
        fatol = POSTERIOR_FATOL
    else:
        fatol = 1e-6
    steps = np.array([task.delta] * 3 + [task.ts] * 2)
    best, value, evaluations = batched_nelder_mead(criterion, start, steps, task.max_evaluations, task.tolerance,
                                                   fatol)
    after = -value
    improved = after > before
    result = np.where(improved[:, None], best, start)
    return {"angles": result[:, :3], "shifts_px": result[:, 3:], "ccc_before": before,
            "ccc_after": np.where(improved, after, before), "evaluations": evaluations + 1}
