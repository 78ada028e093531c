"""Single-pattern coherent diffraction imaging: simulate a pattern, phase it in 2-D or 3-D."""
