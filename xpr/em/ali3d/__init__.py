"""Single-particle projection alignment (`xpr em local_ali3d`): the EM math beside its worker.

Conventions, stated once and used by every module here:

* Arrays: volumes are [z, y, x], images [y, x]; the centre of a box of n pixels is index n // 2
  (SPIDER / RELION / Xmipp convention, also for odd n).
* Orientations: RELION / Heymann–Chagoyen–Belnap (2005) ZYZ Euler angles (rot, tilt, psi) in
  degrees; `euler.rotation_matrices` gives A = R_z(psi) R_y(tilt) R_z(rot).  The projection of a
  volume V in orientation A is P(x, y) = ∫ V(Aᵀ (x, y, z)) dz, so by the central-slice theorem
  P̂(kx, ky) = V̂(Aᵀ (kx, ky, 0)).
* Shifts: RELION's origin offsets o = (rlnOriginX, rlnOriginY) (Å in the STAR file, pixels inside
  the code) are applied after projection: the observed image is the projection translated by +o,
  I(x) = P(x − o), and the shift that centres the particle is −o.  In Fourier space
  Î(k) = P̂(k) exp(−2πi k·o / n).
* Fourier transforms are numpy's (forward unscaled); a frequency index k on an n-box means k / n
  cycles per pixel.
"""
