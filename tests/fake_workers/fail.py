def run(settings, archive):
    archive.save_h5("partial.h5", {"x": [1, 2, 3]}, main=True)
    raise RuntimeError("the computation diverged")
