"""Write tests/data/py4dstem/dpc_scan_16x16.h5 with py4DSTEM itself (0.14.x).

Not run by the tests (py4DSTEM is not an xpr dependency); kept to say how the file was made:
    python tests/data/py4dstem/write_with_py4dstem.py tests/data/py4dstem/dpc_scan_16x16.h5
"""
import sys
from pathlib import Path

import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the tests folder
from em._direct_data import simulate
import py4DSTEM

scan = (16, 16)
data = simulate(scan_size=scan)
cube = data["patterns"].reshape(scan + data["patterns"].shape[1:])
counts = np.round(cube / cube.max() * 60000).astype(np.uint16)   # detector-like integers
# py4DSTEM's Rx/Qx is the first array index (rows), as xpr's y/ky: the array is stored as is
dc = py4DSTEM.DataCube(data=counts)
dc.calibration.set_R_pixel_size(data["settings"]["scan_step_A"])
dc.calibration.set_R_pixel_units("A")
dc.calibration.set_Q_pixel_size(data["rez"])
dc.calibration.set_Q_pixel_units("A^-1")
dc.calibration["convergence_semiangle_mrad"] = data["settings"]["conv_semiangle_mrad"]
dc.calibration.set_QR_rotation_degrees(0.0)
dc.calibration.set_QR_flip(False)
py4DSTEM.save(sys.argv[1], dc, mode="o")
print(counts.shape, data["settings"]["scan_step_A"], data["rez"], data["settings"]["conv_semiangle_mrad"])
