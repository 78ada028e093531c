"""Through-focal series phase retrieval (`xpr em simulate_focal`, `xpr em tie`).

    simulate_focal.py  worker: specimen -> through-focal series file
    tie.py             worker: focal series -> phase by transport of intensity (+ refinements)
    focal_series.py    image formation, noise, misalignment, registration; the FocalSeries record
    solvers.py         TIE solvers (FFT Poisson, Tikhonov, multigrid, ...)
    specimens.py       phantoms: electrostatic and magnetic phase objects
    learned.py         optional learned correction (extra `ml`)
"""
