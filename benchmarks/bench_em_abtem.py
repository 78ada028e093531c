"""xpr ptycho against py4DSTEM on data from an independent simulator (abTEM), same run.

Needs the `bench` extra in its own environment (abTEM and py4DSTEM are not xpr dependencies):

    python -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'
    .venv-bench/bin/python benchmarks/bench_em_abtem.py [--case mos2|thick|all] [--iterations 60]

Cases (abTEM multislice, Poisson counts):

* mos2: MoS2 monolayer (2H, orthogonal cell), 200 kV, 25 mrad, C10 = −100 Å, 32² scan at 0.5 Å,
  64² detector of Δk = 1/(96 · 0.2 Å), 25 000 e⁻/pattern; reconstructed on 96² padded patterns
  (0.2 Å pixels) — the case of issue 17.
* thick: SrTiO3 [001], 6 unit cells (23.4 Å) thick, same optics, 16² scan at 0.5 Å, abTEM
  sampling 0.16 Å (THICK; ≈ 40 s of abTEM on 2 cores, where 10 cells, a 32² scan and 0.1 Å
  took over an hour), 10⁵ e⁻/pattern; single-slice and multislice (4 slices) reconstructions by
  both codes. Cached as abtem_thick_6cells_16scan_100000.npz.
* spread: the MoS2 case with a Gaussian focal spread of 60 Å rms (7 defocus samples, their
  intensities averaged by abTEM), 16² scan, abTEM sampling 0.16 Å (≈ 5 min): one probe mode
  against three.
* aberrated: the MoS2 case (24² scan, sampling 0.16 Å) with a probe that also has C12 30 Å,
  C21 500 Å, C30 5 µm the reconstruction is not told (only C10): refine.aberrations variants
  against the true aberrations given.
* affine: the MoS2 case (24², 0.16 Å) scanned with a 2 % scale/shear distortion the
  reconstruction is not told: positions / scan_affine refinement; "scan distortion left" in the
  notes is what remains of it in the positions each code used (py4DSTEM with its position
  correction and global affine fit too).
* tilted: the thick case with the beam 5 mrad off the zone axis (25 000 e⁻): multislice with
  and without the true tilt in xpr's propagator.

abTEM's wave is simulated on a 57.6 Å periodic cell at 0.1 Å (so the far field spans ±3.3 Å⁻¹
after abTEM's 2/3 anti-aliasing); its 1/57.6 Å⁻¹ pixels are summed 3 × 3 into the 64² detector
(odd binning keeps zero frequency on a pixel centre). abTEM's arrays are (x, y): they are
transposed to xpr's (y, x) so the PL rotation is 0 and no axes are swapped. The truth is σ × the
projected potential abTEM used (its `project()`), on the 0.1 Å grid, with the probe centre of
every scan point in its pixels; r for both codes is xpr.em.ptychography.ptycho.phase_correlation
(truth limited to the detected frequencies, affine-aligned on the probe centres each code used,
planes removed, over the scanned area).

Printed per case and method: r against the truth, wall and CPU time (all threads of the process)
of the calibration and reconstruction calls (with PLRotation_deg / C10 "auto" rows: the fits
included, their angles in the notes; py4DSTEM's own CoM rotation estimates are printed too), and the CPU time's ratio to that of one batched complex64 FFT pair
over all patterns at 96² measured in the same run (on a shared machine wall time depends on the
others' load; CPU time measures the work).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from xpr import backend
from xpr.em import optics
from xpr.em.ptychography import calibration, ptycho
from xpr.em.ptychography.reconstruct import (Options, aberration_names, reconstruct,
                                             refines_defocus)

KV, ALPHA_MRAD, C10 = 200.0, 25.0, -100.0
SCAN, STEP = 32, 0.5
DETECTOR, PAD, PIXEL = 64, 16, 0.2                 # 96² padded → 0.2 Å
BIN = 3
CELL = (DETECTOR + 2 * PAD) * PIXEL * BIN          # 57.6 Å: Δk_fine = 1/57.6, binned 3×
FINE_SAMPLING = 0.1
# the thick case, sized to finish in minutes on a 2-core machine: 16² scan, 6 unit cells, abTEM
# sampling 0.16 Å (its 2/3 band limit, 2.08 Å⁻¹, still beyond the detector's 1.67 Å⁻¹)
THICK = dict(scan=16, cells=6, sampling=0.16, dose=1.0e5)
# partial coherence: the MoS2 case with a Gaussian focal spread (rms 60 Å, 7 defocus samples
# whose intensities abTEM averages), 16² scan, abTEM sampling 0.16 Å
SPREAD = dict(scan=16, spread=60.0, samples=7, sampling=0.16, dose=25000.0)
# residual aberrations the user does not give (only C10 is given): the MoS2 case with 30 Å of
# two-fold astigmatism, 500 Å of axial coma and 5 µm of spherical aberration (abTEM's polar
# coefficients; at 25 mrad their phases reach 2.3, 0.65 and 1.2 rad), 24² scan, sampling 0.16 Å
ABERRATED = dict(scan=24, sampling=0.16, dose=25000.0,
                 probe=dict(C12=30.0, phi12=math.radians(30.0), C21=500.0,
                            phi21=math.radians(-60.0), C30=5.0e4))
# a mistilted thick crystal: the thick case with the beam 5 mrad off the zone axis, (4, 3) mrad
# in (y, x), 25 000 e⁻/pattern
TILTED = dict(THICK, tilt=(4.0, 3.0), dose=25000.0)
# a global scan distortion: the probe really visits A · (raster − centre) + centre, A = 2 %
# scale difference and 2 % shear; the reconstruction is told the raster. 24² scan, 0.16 Å
AFFINE = dict(scan=24, sampling=0.16, dose=25000.0, matrix=[[1.02, 0.02], [0.0, 0.98]])


# ------------------------------------------------------------------ data (abTEM)

def simulate_abtem(case: str, dose: float, seed: int = 0, scan_size: int = SCAN,
                   sampling: float = FINE_SAMPLING, cells: int = THICK["cells"],
                   focal_spread_A: float = 0.0, spread_samples: int = 1,
                   probe_aberrations: dict | None = None, scan_affine=None, tilt_mrad=(0.0, 0.0)):
    """abTEM data of a case; probe_aberrations: extra abTEM polar coefficients (e.g. C12, phi12
    in Å and rad); tilt_mrad: the beam's tilt (y, x) relative to the specimen; scan_affine:
    2 × 2 matrix (y, x) applied to the raster about its centre (the
    probe really goes there; the truth's centres follow, the reconstruction is told the raster)."""
    import abtem
    from ase import Atoms
    from ase.build import mx2

    abtem.config.set({"device": "cpu", "fft": "fftw" if _has_fftw() else "numpy"})
    if case in ("mos2", "spread", "aberrated", "affine"):
        unit = abtem.orthogonalize_cell(mx2(formula="MoS2", kind="2H", a=3.19, thickness=3.13,
                                            vacuum=2.0))
        slice_thickness = 1.0
    else:
        from ase.spacegroup import crystal
        unit = crystal(["Sr", "Ti", "O"], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)],
                       spacegroup=221, cellpar=[3.905, 3.905, 3.905, 90, 90, 90])
        unit *= (1, 1, cells)
        slice_thickness = 1.9525
    reps = (int(math.ceil(CELL / unit.cell[0, 0])) + 1, int(math.ceil(CELL / unit.cell[1, 1])) + 1, 1)
    atoms = unit * reps
    inside = (atoms.positions[:, 0] < CELL) & (atoms.positions[:, 1] < CELL)
    atoms = Atoms(atoms.get_chemical_symbols(), atoms.positions, cell=atoms.cell, pbc=True)[inside]
    atoms.set_cell([CELL, CELL, unit.cell[2, 2]])
    gpts = int(round(CELL / sampling))
    potential = abtem.Potential(atoms, gpts=gpts, slice_thickness=slice_thickness,
                                projection="infinite", parametrization="lobato")
    c10 = C10
    if focal_spread_A > 0:
        c10 = abtem.distributions.gaussian(standard_deviation=focal_spread_A,
                                           num_samples=spread_samples, center=C10,
                                           ensemble_mean=True)
    probe = abtem.Probe(energy=KV * 1e3, semiangle_cutoff=ALPHA_MRAD, C10=c10,
                        tilt=(float(tilt_mrad[0]), float(tilt_mrad[1])),  # abTEM (x, y) = (y, x)
                        **(probe_aberrations or {}))
    start = (CELL - scan_size * STEP) / 2
    iy, ix = np.meshgrid(np.arange(scan_size), np.arange(scan_size), indexing="ij")
    centres = np.stack([start + iy.ravel() * STEP, start + ix.ravel() * STEP], axis=1)
    detector = abtem.PixelatedDetector(max_angle="cutoff")
    if scan_affine is None:
        scan = abtem.GridScan(start=(start, start),
                              end=(start + scan_size * STEP, start + scan_size * STEP),
                              sampling=STEP, endpoint=False)
        patterns = probe.scan(potential, scan=scan, detectors=detector).compute()
        array = np.asarray(patterns.array, dtype=np.float64)      # (sx, sy, kx, ky), centred
    else:                     # the probe at the distorted positions, scan order y slow, x fast
        middle = centres.mean(axis=0)
        centres = (centres - middle) @ np.asarray(scan_affine, dtype=np.float64).T + middle
        scan = abtem.CustomScan(centres[:, ::-1].copy())         # abTEM positions are (x, y)
        patterns = probe.scan(potential, scan=scan, detectors=detector).compute()
        array = np.asarray(patterns.array, dtype=np.float64)      # (N, kx, ky)
        array = array.reshape((scan_size, scan_size) + array.shape[-2:])
        array = np.transpose(array, (1, 0, 2, 3))                 # → (x, y, kx, ky) like a grid
    assert array.shape[:2] == (scan_size, scan_size), array.shape
    n_fine = array.shape[-1]
    centre = n_fine // 2
    width = DETECTOR * BIN
    # bin j covers fine [low + j·BIN, …]: its centre low + j·BIN + (BIN−1)/2 is zero for j = 32
    low = centre - DETECTOR // 2 * BIN - (BIN - 1) // 2
    crop = array[..., low:low + width, low:low + width]
    binned = crop.reshape(scan_size, scan_size, DETECTOR, BIN, DETECTOR, BIN).sum(axis=(3, 5))
    data = np.transpose(binned, (1, 0, 3, 2))                     # → (y, x, ky, kx)
    rng = np.random.default_rng(seed)
    data = rng.poisson(data * dose).astype(np.float32)
    projected = np.asarray(potential.project().compute().array, dtype=np.float64).T   # (y, x)
    scan_size = np.int64(scan_size)
    sigma = optics.interaction_constant(KV)
    truth = sigma * projected
    fine_pixel = CELL / gpts
    return dict(data=data, truth=truth.astype(np.float32), truth_pixel_A=fine_pixel,
                truth_centres_px=centres / fine_pixel, rez=1.0 / (CELL / BIN),
                thickness=float(unit.cell[2, 2]), scan_size=scan_size)


def _has_fftw():
    try:
        import pyfftw  # noqa: F401
    except ImportError:
        return False
    return True


def load_or_simulate(case, dose, workdir: Path):
    """The case's abTEM data, simulated once and cached in workdir (an .npz named after it)."""
    if case == "thick":
        size = dict(scan_size=THICK["scan"], sampling=THICK["sampling"], cells=THICK["cells"])
        name = f"abtem_thick_{THICK['cells']}cells_{THICK['scan']}scan_{int(dose)}.npz"
    elif case == "spread":
        size = dict(scan_size=SPREAD["scan"], sampling=SPREAD["sampling"],
                    focal_spread_A=SPREAD["spread"], spread_samples=SPREAD["samples"])
        name = f"abtem_spread_{int(SPREAD['spread'])}A_{SPREAD['scan']}scan_{int(dose)}.npz"
    elif case == "aberrated":
        size = dict(scan_size=ABERRATED["scan"], sampling=ABERRATED["sampling"],
                    probe_aberrations=ABERRATED["probe"])
        name = f"abtem_aberrated_{ABERRATED['scan']}scan_{int(dose)}.npz"
    elif case == "tilted":
        size = dict(scan_size=TILTED["scan"], sampling=TILTED["sampling"], cells=TILTED["cells"],
                    tilt_mrad=TILTED["tilt"])
        name = f"abtem_tilted_{TILTED['cells']}cells_{TILTED['scan']}scan_{int(dose)}.npz"
    elif case == "affine":
        size = dict(scan_size=AFFINE["scan"], sampling=AFFINE["sampling"],
                    scan_affine=AFFINE["matrix"])
        name = f"abtem_affine_{AFFINE['scan']}scan_{int(dose)}.npz"
    else:
        size, name = {}, f"abtem_{case}_{int(dose)}.npz"
    path = workdir / name
    if path.is_file():
        return dict(np.load(path)), 0.0
    start = time.perf_counter()
    sim = simulate_abtem(case, dose, **size)
    seconds = time.perf_counter() - start
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(path, **sim)
    return sim, seconds


def distortion_left(centres_px, pixel_A, sim):
    """Largest entry (%) of M − I, M the linear part of the least-squares affine map from a
    reconstruction's probe centres (Å) to the true ones (Å): 0 when the positions it used have
    the true geometry, ≈ 2 for the raster on the affine case."""
    matrix = ptycho.fit_affine(np.asarray(centres_px) * pixel_A,
                               np.asarray(sim["truth_centres_px"]) * float(sim["truth_pixel_A"]))
    return 100.0 * float(np.abs(matrix[:2] - np.eye(2)).max())


def correlation(phase_image, centres_px, sim, k_max):
    """r of a reconstructed phase (y, x) whose scan-point probe centres are centres_px."""
    return ptycho.phase_correlation(np.exp(1j * phase_image[None]), None, centres_px, 0,
                                    sim["truth"], None, None,
        float(sim["truth_pixel_A"]), k_max, true_centres_px=sim["truth_centres_px"])


# ------------------------------------------------------------------ xpr

FURTHER = ("C12a", "C12b", "C21a", "C21b", "C30")       # the aberrations refined beyond C10


def true_krivanek(polar: dict) -> list:
    """abTEM's polar coefficients (C12, phi12, C21, phi21, C30; its χ has C_nm cos(m(φ − φ_nm)),
    the azimuth measured in the same (x, y) frame as xpr's (kx, ky) once the arrays are
    transposed) as xpr's Krivanek list [C10, C12a, C12b, C21a, C21b, C23a, C23b, C30] with
    a = C cos(mφ_nm), b = C sin(mφ_nm)."""
    def ab(n, m):
        c, phi = polar.get(f"C{n}{m}", 0.0), polar.get(f"phi{n}{m}", 0.0)
        return [c * math.cos(m * phi), c * math.sin(m * phi)]

    return [C10] + ab(1, 2) + ab(2, 1) + [0.0, 0.0, polar.get("C30", 0.0)]


def run_xpr(sim, slices, thickness, epochs, modes=1, patience=5, calibrated=None,
            tilt_mrad=None, **options):
    """xpr's reconstruction; `calibrated` overrides the calibration given (e.g. PLRotation_deg
    "auto", aberrations None: fitted by calibration from the data), the fit time included."""
    settings = dict(acc_voltage=KV, conv_semiangle_mrad=ALPHA_MRAD, rez_pixel_size_A=float(sim["rez"]),
                    scan_step_A=STEP, aberrations=[C10], PLRotation_deg=0.0, data_pad=PAD,
                    num_slices=slices, total_thickness=thickness)
    settings.update(calibrated or {})
    start = time.perf_counter(), time.process_time()
    experiment = calibration.Experiment.from_settings(settings, sim["data"])
    if experiment.c10_from_parallax:                   # as the ptycho command does
        options["refine_defocus"] = True
    probe = dict(modes=modes, mode_type="hermite", higher_mode_power=0.01, focal_spread_A=0.0)
    options.setdefault("probe_from_epoch", 2)
    opts = Options(epochs=epochs, patience=patience, **options)
    model, counts, mask, params, opts = ptycho.prepare(experiment, opts, probe, backend.cpu())
    if tilt_mrad is not None:            # a known specimen tilt in the multislice propagator
        params["tilt"] = np.asarray(tilt_mrad, dtype=np.float64)
    params, history = reconstruct(model, counts, params, opts, mask=mask)
    seconds = time.perf_counter() - start[0], time.process_time() - start[1]
    phase = np.sum(np.angle(params["object"]), axis=0)
    centres = ptycho.probe_centres_px(params["positions"], model.window)
    r = correlation(phase, centres, sim, ptycho.measured_k_max(experiment))
    notes = (f"epochs {len(history.loss)}, best {history.best_epoch}; scan distortion left "
             f"{distortion_left(centres, experiment.pixel_size_A, sim):.2f} %")
    if experiment.pl_rotation_fit is not None:
        fit, parallax = experiment.pl_rotation_fit, experiment.parallax_fit
        notes += (f"; PL rotation {experiment.pl_rotation_deg:.2f}° (CoM fit "
                  f"{fit.angle_deg:.2f}°, curl ratio {fit.curl_ratio:.2f}; parallax "
                  f"{parallax.angle_deg:.2f}° ± {parallax.uncertainty_deg:.2f}°)")
    if experiment.c10_from_parallax:
        notes += (f"; C10 {experiment.aberrations[0]:.1f} Å from the parallax, refined to "
                  f"{experiment.aberrations[0] - float(params['defocus'][0]):.1f} Å")
    elif refines_defocus(opts):
        c10 = experiment.aberrations[0] - float(params["defocus"][0])
        notes += f"; C10 refined to {c10:.1f} Å"
    if tilt_mrad is not None:
        notes += f"; tilt ({tilt_mrad[0]:.1f}, {tilt_mrad[1]:.1f}) mrad in the model"
    if aberration_names(opts):
        notes += "; refined " + ", ".join(
            f"{name} {float(change):.0f}" for name, change in
            zip(aberration_names(opts), params["aberrations"])) + " Å"
    return r, seconds, notes


# ------------------------------------------------------------------ py4DSTEM

def run_py4dstem(sim, slices, thickness, iterations, **reconstruct_options):
    import py4DSTEM
    from py4DSTEM.process.phase import MultislicePtychography, SingleslicePtychography

    cube = py4DSTEM.DataCube(data=sim["data"])
    cube.calibration.set_R_pixel_size(STEP)
    cube.calibration.set_R_pixel_units("A")
    cube.calibration.set_Q_pixel_size(float(sim["rez"]))
    cube.calibration.set_Q_pixel_units("A^-1")
    common = dict(datacube=cube, energy=KV * 1e3, semiangle_cutoff=ALPHA_MRAD,
                  polar_parameters={"C10": C10}, device="cpu", verbose=False,
                  object_padding_px=(18, 18))
    start = time.perf_counter(), time.process_time()
    if slices == 1:
        method = SingleslicePtychography(**common)
    else:
        method = MultislicePtychography(num_slices=slices, slice_thicknesses=thickness / slices,
                                        **common)
    method.preprocess(padded_diffraction_intensities_shape=(DETECTOR + 2 * PAD,) * 2,
                      plot_center_of_mass=False, plot_rotation=False, plot_probe_overlaps=False,
                      force_com_rotation=0.0, force_com_transpose=False)
    method.reconstruct(num_iter=iterations, progress_bar=False, reset=True,
                       **reconstruct_options)
    seconds = time.perf_counter() - start[0], time.process_time() - start[1]
    obj = np.asarray(method.object)
    phase = np.angle(obj) if obj.ndim == 2 else np.sum(np.angle(obj), axis=0)
    centres = np.asarray(method._positions_px)               # probe centres (x-first axes)
    k_max = DETECTOR // 2 * float(sim["rez"])
    r = correlation(phase, centres, sim, k_max)
    pixel = float(method.sampling[0])
    return r, seconds, (f"{iterations} iterations, pixel {pixel:.3f} Å; scan distortion left "
                        f"{distortion_left(centres, pixel, sim):.2f} %")


def py4dstem_rotation(sim):
    """py4DSTEM's own PL-rotation estimates from the CoM field (min curl; max divergence)."""
    import py4DSTEM
    from py4DSTEM.process.phase import SingleslicePtychography

    cube = py4DSTEM.DataCube(data=sim["data"])
    cube.calibration.set_R_pixel_size(STEP)
    cube.calibration.set_R_pixel_units("A")
    cube.calibration.set_Q_pixel_size(float(sim["rez"]))
    cube.calibration.set_Q_pixel_units("A^-1")
    angles = []
    for divergence in (False, True):
        method = SingleslicePtychography(datacube=cube, energy=KV * 1e3, semiangle_cutoff=ALPHA_MRAD,
                                         polar_parameters={"C10": C10}, device="cpu",
                                         verbose=False)
        method.preprocess(padded_diffraction_intensities_shape=(DETECTOR + 2 * PAD,) * 2,
                          plot_center_of_mass=False, plot_rotation=False,
                          plot_probe_overlaps=False, maximize_divergence=divergence)
        angles.append((math.degrees(float(method._rotation_best_rad)),
                       bool(method._rotation_best_transpose)))
    return angles


# ------------------------------------------------------------------ main

def fft_pair_seconds(n_patterns, n, repeats=5):
    """(fastest wall, smallest CPU time) of one batched complex64 FFT pair."""
    be = backend.cpu()
    a = (np.random.default_rng(0).standard_normal((n_patterns, n, n)) + 0j).astype(np.complex64)
    wall = cpu = np.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        be.ifftn(be.fftn(a, axes=(-2, -1)), axes=(-2, -1))
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="mos2", choices=[
        "mos2", "thick", "spread", "aberrated", "affine", "tilted", "all"])
    parser.add_argument("--iterations", type=int, default=60, help="py4DSTEM iterations")
    parser.add_argument("--epochs", type=int, default=60, help="xpr epochs at most")
    parser.add_argument("--workdir", default="/tmp/xpr_bench_abtem", help="abTEM data cache")
    parser.add_argument("--skip-py4dstem", action="store_true")
    parser.add_argument("--only", default=None, help="run only the methods whose name has this")
    args = parser.parse_args()
    cases = ["mos2", "thick", "spread", "aberrated", "affine", "tilted"] if args.case == "all" \
        else [args.case]
    for case in cases:
        dose = dict(mos2=25000.0, thick=THICK["dose"], spread=SPREAD["dose"],
                    aberrated=ABERRATED["dose"], affine=AFFINE["dose"],
                    tilted=TILTED["dose"])[case]
        sim, sim_seconds = load_or_simulate(case, dose, Path(args.workdir))
        if sim_seconds:
            print(f"({case}: abTEM simulation {sim_seconds:.0f} s)")
        n_patterns = int(np.prod(sim["data"].shape[:2]))
        t_fft, cpu_fft = fft_pair_seconds(n_patterns, DETECTOR + 2 * PAD)
        print(f"\n{case}: one complex64 FFT pair over {n_patterns} patterns of 96²: "
              f"{t_fft * 1e3:.1f} ms wall, {cpu_fft * 1e3:.1f} ms CPU")
        print("| case | method | r | wall s | CPU s (all threads) | CPU / FFT-pair CPU | notes |")
        print("|---|---|---|---|---|---|---|")
        thickness = float(sim["thickness"])
        if not args.skip_py4dstem:
            (curl, t1), (div, t2) = py4dstem_rotation(sim)
            print(f"({case}: py4DSTEM's CoM rotation estimate {curl:.1f}°{' transposed' if t1 else ''}"
                  f" (min curl), {div:.1f}°{' transposed' if t2 else ''} (max divergence); true 0°)")
        runs = [("xpr 1 slice (defaults: C12, C21 refined)", lambda: run_xpr(
                    sim, 1, thickness, args.epochs)),
                ("xpr 1 slice, no aberrations refined", lambda: run_xpr(
                    sim, 1, thickness, args.epochs, refine_aberrations=())),
                ("xpr 1 slice, refine C12 C21 C30", lambda: run_xpr(
                    sim, 1, thickness, args.epochs, refine_aberrations=FURTHER)),
                ("xpr 1 slice, refine C10 C12 C21 C30", lambda: run_xpr(
                    sim, 1, thickness, args.epochs, refine_aberrations=("C10",) + FURTHER))]
        if case == "aberrated":
            runs += [("xpr 1 slice, refine C12", lambda: run_xpr(
                         sim, 1, thickness, args.epochs, refine_aberrations=("C12a", "C12b"))),
                     ("xpr 1 slice, C10 C12 C21 C30 refined, probe not refined", lambda: run_xpr(
                         sim, 1, thickness, args.epochs, refine_probe=False,
                         refine_aberrations=("C10",) + FURTHER)),
                     ("xpr 1 slice, the true aberrations given", lambda: run_xpr(
                         sim, 1, thickness, args.epochs,
                         calibrated=dict(aberrations=true_krivanek(ABERRATED["probe"]))))]
        if case == "affine":
            runs += [("xpr 1 slice, refine positions", lambda: run_xpr(
                         sim, 1, thickness, args.epochs, refine_positions=True)),
                     ("xpr 1 slice, refine scan affine", lambda: run_xpr(
                         sim, 1, thickness, args.epochs, refine_scan_affine=True)),
                     ("xpr 1 slice, refine scan affine, then positions", lambda: run_xpr(
                         sim, 1, thickness, args.epochs, refine_scan_affine=True,
                         refine_positions=True, positions_from_epoch=10))]
            if not args.skip_py4dstem:
                runs.append(("py4DSTEM single-slice, positions", lambda: run_py4dstem(
                    sim, 1, thickness, args.iterations, fix_positions=False)))
                runs.append(("py4DSTEM single-slice, positions and global affine", lambda:
                             run_py4dstem(sim, 1, thickness, args.iterations, fix_positions=False,
                                          global_affine_transformation=True)))
        if case not in ("aberrated", "affine"):
            runs += [
                ("xpr 1 slice, 0.3 Å (data_pad 0)", lambda: run_xpr(
                    sim, 1, thickness, args.epochs, calibrated=dict(data_pad=0))),
                ("xpr 1 slice, former defaults (lsq_sqrt, no band limit)", lambda: run_xpr(
                    sim, 1, thickness, args.epochs, loss="lsq_sqrt", object_band_limit=None)),
                ("xpr 1 slice, 3 probe modes", lambda: run_xpr(sim, 1, thickness, args.epochs,
                                                               modes=3)),
                ("xpr 1 slice, 3 probe modes, former defaults", lambda: run_xpr(
                    sim, 1, thickness, args.epochs, modes=3, loss="lsq_sqrt",
                    object_band_limit=None)),
                ("xpr 1 slice, PL rotation auto", lambda: run_xpr(
                    sim, 1, thickness, args.epochs, calibrated=dict(PLRotation_deg="auto"))),
                ("xpr 1 slice, PL rotation and C10 auto", lambda: run_xpr(
                    sim, 1, thickness, args.epochs,
                    calibrated=dict(PLRotation_deg="auto", aberrations=None)))]
        if not args.skip_py4dstem:
            runs.append(("py4DSTEM single-slice", lambda: run_py4dstem(sim, 1, thickness,
                                                                       args.iterations)))
        if case == "tilted":           # the multislice rows below and the true tilt
            runs = [("xpr 1 slice", lambda: run_xpr(sim, 1, thickness, args.epochs)),
                    ("xpr 4 slices, the true tilt in the model", lambda: run_xpr(
                        sim, 4, thickness, args.epochs, tilt_mrad=TILTED["tilt"]))]
        if case in ("thick", "tilted"):
            runs.append(("xpr 4 slices", lambda: run_xpr(sim, 4, thickness, args.epochs)))
            if not args.skip_py4dstem:
                runs.append(("py4DSTEM multislice 4", lambda: run_py4dstem(
                    sim, 4, thickness, args.iterations)))
        for name, work in runs:
            if args.only and args.only not in name:
                continue
            try:
                r, (seconds, cpu), notes = work()
            except ValueError as error:          # e.g. a peer's positions left its object
                if not name.startswith("py4DSTEM"):
                    raise
                print(f"| {case} | {name} | failed | | | | {error} |", flush=True)
                continue
            print(f"| {case} | {name} | {r:.3f} | {seconds:.1f} | {cpu:.1f} | {cpu / cpu_fft:.0f} "
                  f"| {notes} |", flush=True)


if __name__ == "__main__":
    main()
