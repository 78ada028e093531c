"""Fluctuation X-ray scattering: cross-correlations → rotational invariants → single-particle
density (xFrame's fxs workflow). Data side: grids, harmonics, hankel, models, invariants,
extraction, detector, cross_correlation and the workers simulate_ccd, simulate_patterns,
correlate, extract; see docs/fxs.md."""
