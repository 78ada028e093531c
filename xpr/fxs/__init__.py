"""Fluctuation X-ray scattering: cross-correlations → rotational invariants → single-particle
density (xFrame's fxs workflow). Shared: grids (every radial/angular grid, data side and
phasing), transforms (harmonic + Hankel transforms of densities on the phasing grids). Data side:
harmonics, models, invariants, extraction, detector, cross_correlation and the workers
simulate_ccd, simulate_patterns, correlate, extract (docs/fxs.md). Phasing side: real_space
(starting densities, blur, shrink-wrap), reciprocal_projection (the invariant constraint),
iterate (the schedule on xpr.phasing's engine), particle_number, xframe_settings, alignment and
the workers reconstruct, average (docs/fxs_reconstruct.md)."""
