from xpr.errors import InputError


def run(settings, archive):
    raise InputError("pattern and mask shapes differ: [64, 64] vs [32, 32]", file="mask.npy", key="input.mask_path")
