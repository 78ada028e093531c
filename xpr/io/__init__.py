"""File formats: HDF5 trees, VTK structured grids, input-array readers; every write is atomic."""
from xpr.io.atomic import atomic_path
from xpr.io.h5 import load_tree, save_tree
from xpr.io.readers import read_array
from xpr.io.vtk import save_vts

__all__ = ["atomic_path", "load_tree", "save_tree", "read_array", "save_vts"]
