"""Electron imaging: 4D-STEM simulation, iterative ptychography, direct methods, TIE.

Shared conventions of the package (see xpr.em.optics): lengths in Å, reciprocal lengths in Å⁻¹
without 2π, Fourier-space arrays centred (zero frequency at index n // 2), probes normalised to
unit total intensity, aberrations as a Krivanek list in Å with C10 = −defocus.
"""
from __future__ import annotations


def default_backend():
    """The CPU backend used when a caller passes none."""
    from xpr import backend

    return backend.cpu()
