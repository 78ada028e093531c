import numpy as np


def run(settings, archive):
    values = np.arange(settings.n, dtype=float) ** settings.power.exponent * settings.scale
    archive.log.info("squares of %d numbers", settings.n)
    archive.save_h5("square.h5", {"values": values, "label": settings.label}, main=True)
    return {"values": values}
