"""4D-STEM: simulation, iterative multislice ptychography and direct methods.

Workers (one per `xpr em` command):
    simulate_4dstem.py  specimen -> 4D-STEM data set
    ptycho.py           iterative multislice ptychography
    dpc.py, wdd.py, tcbf.py   direct methods: centre of mass, Wigner-distribution deconvolution /
                        single sideband, tilt-corrected bright field

Library:
    calibration.py  reading an experiment: data, scan geometry, rotation, probe calibration
    direct.py       shared pieces of the direct methods
    multislice.py   slice propagation; potentials.py  projected atomic potentials

    forward.py      probe modes × object slices, sub-pixel Fourier shifts, Fresnel propagation,
                    far-field intensities, and the analytic (Wirtinger) gradients of a loss
    losses.py       ml (Poisson, default), lsq_sqrt (Gaussian on amplitudes), lsq (Gaussian on intensities)
    regularisers.py phase L1, total variation, probe window (the object band limit: reconstruct.object_band)
    lbfgs.py        L-BFGS with a strong-Wolfe line search on dicts of complex/real arrays
    checkpoints.py  save / resume reconstructions
"""
