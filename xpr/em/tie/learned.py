"""Learned correction of TIE phases (optional extra `ml`: PyTorch, CPU is enough).

A small fully convolutional network learns the residual exact phase − retrieved phase from
simulated pairs made with the optics of the data at hand (pixel size, voltage, defocus values,
noise level): random particles as in `simulate_focal`, their focal series, the plain TIE phase
retrieved with `tie`'s own settings. Its input is either the TIE phase and the log in-focus
intensity (`inputs: tie_phase`, residual learning) or the focal images themselves (`inputs:
images`, phase-ret-dl's other variant, still added to the TIE phase). Periodic (circular)
padding, as the fields are. The loss is the mean squared error after removing each image's mean
(the phase offset is not observable). A held-out set gives the rms error with and without the
correction, in the window `tie` reports.

PyTorch is imported only here and only when a correction is asked for.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from xpr.backend import Backend
from xpr.em.tie import focal_series, specimens
from xpr.em.tie.focal_series import FocalSeries
from xpr.em.optics import electron_wavelength_A
from xpr.em.tie.solvers import rms_error_in_window
from xpr.errors import SettingsError


def _torch():
    try:
        import torch
    except ImportError:
        raise SettingsError("the learned correction needs PyTorch: pip install 'xpr[ml]' "
                            "(CPU wheels suffice)", key="learned_correction") from None
    return torch


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

def build_network(in_channels, channels=16, layers=4):
    """conv3×3 → ReLU, `layers` times, then conv3×3 to one channel: the phase residual."""
    torch = _torch()
    blocks, width = [], in_channels
    for _ in range(layers):
        blocks += [torch.nn.Conv2d(width, channels, 3, padding=1, padding_mode="circular"),
                   torch.nn.ReLU()]
        width = channels
    blocks.append(torch.nn.Conv2d(width, 1, 3, padding=1, padding_mode="circular"))
    return torch.nn.Sequential(*blocks)


def network_inputs(inputs, phase_tie, images, in_focus_intensity):
    """(channels, y, x) float32 array fed to the network."""
    log_intensity = np.log(np.maximum(in_focus_intensity, 1e-6) / in_focus_intensity.mean())
    if inputs == "tie_phase":
        return np.stack([phase_tie - phase_tie.mean(), log_intensity]).astype(np.float32)
    normalised = images / images.mean(axis=(1, 2), keepdims=True) - 1.0
    return np.concatenate([normalised, (phase_tie - phase_tie.mean())[None]]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Training pairs from simulated specimens
# ---------------------------------------------------------------------------------------------

def simulated_pairs(series, settings, retrieve, count, rng, log=None):
    """`count` (inputs, phase_tie, exact_phase) triples with the optics of `series`.

    `retrieve(series_like, images)` is tie's TIE retrieval (refinement off); the specimens are
    random polyhedra/ellipsoids of the training `radius_m`, noise as `noise_level`.
    """

    options = settings.learned_correction
    training = options.training
    size = int(training.image_size)
    shape = (size, size)
    pixel = series.pixel_size_m
    wavelength_m = electron_wavelength_A(series.accelerating_voltage_kV) * 1e-10
    cpu = Backend(False, "double")
    transfers = [focal_series.transfer_function(cpu, shape, pixel, wavelength_m, d,
                                                spherical_aberration_m=series.spherical_aberration_m)
                 for d in series.defocus_m]
    pairs = []
    for index in range(count):
        kind = "polyhedra" if index % 2 == 0 else "ellipsoids"
        thickness = specimens.random_particles_thickness_m(
            shape, pixel, kind, int(rng.integers(1, int(training.max_particles) + 1)),
            float(training.radius_m), rng)
        potential = float(training.mean_inner_potential_V) * rng.uniform(0.7, 1.3)
        phase, amplitude = specimens.electrostatic_phase_and_amplitude(
            thickness, potential, float(training.absorption_potential_V) * rng.uniform(0.5, 1.5),
            series.accelerating_voltage_kV)
        images = focal_series.focal_series_images(cpu, amplitude * np.exp(1j * phase), transfers)
        images = focal_series.add_noise(images, "poisson", float(training.noise_level), rng)
        small = FocalSeries(path=f"simulated pair {index}", images=images,
                            defocus_m=series.defocus_m,
                            accelerating_voltage_kV=series.accelerating_voltage_kV,
                            pixel_size_m=pixel, spherical_aberration_m=series.spherical_aberration_m)
        result = retrieve(small, images)
        pairs.append((network_inputs(options.inputs, result["phase_tie"], images,
                                     result["in_focus_intensity"]),
                      result["phase_tie"], phase))
    if log is not None:
        log.info("learned correction: %d simulated training pairs of %d² pixels", count, size)
    return pairs


# ---------------------------------------------------------------------------------------------
# Training, saving, loading, applying
# ---------------------------------------------------------------------------------------------

def train(pairs, options, seed, log=None):
    """Fit the network to the residuals exact − TIE (offset removed); returns the network."""
    torch = _torch()
    previous_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(int(options.threads))
    try:
        return _train(torch, pairs, options, seed, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train(torch, pairs, options, seed, log):
    torch.manual_seed(int(seed))
    inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
    residual = torch.from_numpy(np.stack([(p[2] - p[2].mean()) - (p[1] - p[1].mean())
                                          for p in pairs]).astype(np.float32))[:, None]
    network = build_network(inputs.shape[1], int(options.channels), int(options.layers))
    optimiser = torch.optim.Adam(network.parameters(), lr=float(options.learning_rate))
    batch = max(1, min(int(options.batch_size), len(pairs)))
    generator = torch.Generator().manual_seed(int(seed))
    for epoch in range(int(options.epochs)):
        order = torch.randperm(len(pairs), generator=generator)
        total = 0.0
        for start in range(0, len(pairs), batch):
            chosen = order[start:start + batch]
            prediction = network(inputs[chosen])
            difference = prediction - residual[chosen]
            difference = difference - difference.mean(dim=(2, 3), keepdim=True)
            loss = (difference ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(chosen)
        if log is not None and (epoch + 1) % max(1, int(options.epochs) // 5) == 0:
            log.info("learned correction: epoch %d, training rms %.4f rad", epoch + 1,
                     math.sqrt(total / len(pairs)))
    return network


def correct(network, network_input, phase_tie):
    """TIE phase plus the predicted residual."""
    torch = _torch()
    with torch.no_grad():
        residual = network(torch.from_numpy(network_input[None]))[0, 0].numpy()
    return phase_tie + residual.astype(phase_tie.dtype)


def held_out_errors(network, pairs, radius_fraction):
    """Mean rms error (rad) without and with the correction over held-out pairs."""
    without = [rms_error_in_window(p[1], p[2], radius_fraction) for p in pairs]
    with_correction = [rms_error_in_window(correct(network, p[0], p[1]), p[2], radius_fraction)
                       for p in pairs]
    return float(np.mean(without)), float(np.mean(with_correction))


def save(network, path, options, inputs, in_channels):
    torch = _torch()
    torch.save({"state_dict": network.state_dict(),
                "config": {"in_channels": int(in_channels), "channels": int(options.channels),
                           "layers": int(options.layers), "inputs": str(inputs)}}, str(path))


def load(path):
    """(network, inputs kind) from a file written by `save`."""
    torch = _torch()
    stored = torch.load(str(path), weights_only=True)
    config = stored["config"]
    network = build_network(config["in_channels"], config["channels"], config["layers"])
    network.load_state_dict(stored["state_dict"])
    network.eval()
    return network, config["inputs"], config["in_channels"]


def no_refinement(settings):
    """tie's settings with the refinement switched off (the network corrects the TIE phase)."""
    return SimpleNamespace(tie=settings.tie,
                           refinement=SimpleNamespace(method="none", iterations=0,
                                                      fit_amplitude=False))
