"""Iterative multislice ptychography: forward model, losses, Wirtinger gradients, L-BFGS.

    forward.py      probe modes × object slices, sub-pixel Fourier shifts, Fresnel propagation,
                    far-field intensities, and the analytic (Wirtinger) gradients of a loss
    losses.py       lsq_sqrt (Gaussian on amplitudes), ml (Poisson), lsq (Gaussian on intensities)
    regularisers.py phase L1, total variation, probe window
    lbfgs.py        L-BFGS with a strong-Wolfe line search on dicts of complex/real arrays
    checkpoints.py  save / resume reconstructions
"""
