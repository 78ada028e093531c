"""fxs simulate_patterns: single-shot diffraction patterns of randomly oriented copies of a model.

For every pattern p and each of its n_particles copies c, draw a uniformly random rotation R_pc
(seeded per chunk, so the patterns do not depend on the number of processes). The copies scatter
incoherently (dilute sample), so the expected photon count of a pixel is

    N̄_pix = Φ · r_e² · ΔΩ_pix · Σ_c |F(R_pcᵀ q_pix)|²,

with F the analytic amplitude of the model (``models``), q_pix the pixel's momentum transfer on the
Ewald sphere (``detector``), ΔΩ its solid angle, r_e the classical electron radius and Φ the
fluence (photons/Å²). With ``noise.poisson`` the pattern is a Poisson draw of N̄; otherwise N̄.
Polarisation is not modelled.

Output: chunk files patterns_<k>.h5 (dataset ``data`` (n, rows, columns) float32 and the
``rotations``), patterns_list.txt (one pattern file per line, xFrame's input list) and the main
file patterns.h5 with the detector geometry and the file list (the default input of correlate).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from xpr import parallel
from xpr.io.atomic import atomic_path
from xpr.backend import cpu_only
from . import memory_plan
from .detector import Detector
from .models import model_from_settings, random_rotation

CLASSICAL_ELECTRON_RADIUS = 2.8179403262e-5   # Å


def simulate_chunk(task) -> dict:
    """Patterns of one chunk (module level, so that processes can run it)."""
    model, detector, dims = task["model"], task["detector"], task["dimensions"]
    rng = np.random.default_rng(task["seed"])
    q = detector.q_vectors(dims)
    scale = task["fluence"] * CLASSICAL_ELECTRON_RADIUS ** 2 * detector.solid_angles()
    n = task["n_patterns"]
    data = np.empty((n,) + detector.shape, dtype=np.float32)
    rotations = np.empty((n, task["n_particles"], dims, dims))
    for i in range(n):
        intensity = np.zeros(detector.shape)
        for c in range(task["n_particles"]):
            rotation = random_rotation(dims, rng)
            rotations[i, c] = rotation
            intensity += model.rotated(rotation).intensity(q)
        expected = scale * intensity
        data[i] = rng.poisson(expected) if task["poisson"] else expected
    return {"data": data, "rotations": rotations}


def write_chunk(path: Path, result: dict) -> Path:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=result["data"])
            f.create_dataset("rotations", data=result["rotations"])
    return path


def validate(settings):
    """Before the run folder exists: exit 2 when not even one chunk per worker fits in memory
    (a malformed detector is left to the Detector's own check in run)."""
    try:
        [int(v) for v in settings.detector.image_dimensions]
    except (TypeError, ValueError):
        return
    memory_plan.plan_simulate_patterns(settings, -(-int(settings.n_patterns) // int(settings.chunk_size)))


def run(settings, archive):
    """Model → n_patterns detector images + pattern list."""
    cpu_only(settings, archive.log, "fxs simulate_patterns", "pattern chunks spread over processes")
    dims = settings.dimensions
    detector = Detector.from_settings(settings.detector)
    rng = np.random.default_rng(settings.random_seed)
    model = model_from_settings(settings.shapes, dims, rng)
    n_total, chunk = settings.n_patterns, settings.chunk_size
    sizes = [min(chunk, n_total - start) for start in range(0, n_total, chunk)]
    seeds = parallel.task_seeds(settings.random_seed, len(sizes))
    tasks = [{"model": model, "detector": detector, "dimensions": dims, "seed": seed,
              "n_patterns": size, "n_particles": settings.n_particles,
              "fluence": float(settings.noise.fluence), "poisson": settings.noise.poisson}
             for size, seed in zip(sizes, seeds)]
    archive.log.info("%d patterns of %d×%d pixels in %d chunks, q ≤ %.3g 1/Å on full rings",
                     n_total, *detector.shape, len(tasks), detector.max_full_ring_q())
    bar = archive.progress(total=n_total, desc="patterns")
    files = []
    batch = memory_plan.plan_simulate_patterns(settings, len(tasks), log=archive.log)   # chunks at once
    for start in range(0, len(tasks), batch):
        results = parallel.map(simulate_chunk, tasks[start:start + batch], settings.multi_process,
                               on_result=lambda i, r: bar.update(len(r["data"]) if isinstance(r, dict) else 0))
        for k, result in enumerate(results, start):
            files.append(str(write_chunk(archive.file(f"patterns_{k:05d}.h5"), result)))
    bar.close()
    with atomic_path(archive.file("patterns_list.txt")) as tmp:
        tmp.write_text("\n".join(files) + "\n")
    tree = {"dimensions": dims, "detector": detector.to_tree(), "xray_wavelength": detector.wavelength,
            "pattern_files": tuple(Path(f).name for f in files), "dataset": "data",
            "number_of_patterns": n_total, "number_of_particles": settings.n_particles,
            "fluence": settings.noise.fluence, "poisson_noise": bool(settings.noise.poisson)}
    archive.save_h5("patterns.h5", tree, main=True)

    from xpr import plot
    with h5py.File(files[0], "r") as f:
        first = f["data"][0]
    fig, ax = plot.figure(1, 1)
    plot.image(ax, np.log10(np.maximum(first, first.max() * 1e-8) if first.max() > 0 else first + 1),
               title="first pattern, log10 counts")
    archive.savefig(fig, "first_pattern.png")
    return {"pattern_files": files, "detector": detector}
