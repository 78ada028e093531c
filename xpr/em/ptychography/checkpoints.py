"""Checkpoints: the refined arrays, the epoch reached and the loss history, in one HDF5 file.

Resuming restores object, probe, positions, defocus, aberrations and the scan's affine map and
continues the epoch count; the L-BFGS history is rebuilt from scratch (it is a cheap, local
curvature model).
"""
from __future__ import annotations

import numpy as np

from xpr.errors import InputError
from xpr.io import load_tree, save_tree


def save(path, params: dict, epoch: int, history, be):
    save_tree(path, {
        "object": be.asnumpy(params["object"]), "probe": be.asnumpy(params["probe"]),
        "positions": be.asnumpy(params["positions"]), "epoch": int(epoch),
        **({key: be.asnumpy(params[key])
            for key in ("defocus", "aberrations", "scan_affine", "scan_centre")
            if params.get(key) is not None}),
        "loss": np.asarray(history.loss), "evaluations": np.asarray(history.evaluations),
        "seconds": np.asarray(history.seconds), "epochs": np.asarray(history.epoch),
        "validation": np.asarray(history.validation, dtype=np.float64),
        "best_epoch": int(history.best_epoch)})


def load(path, like: dict, be):
    """(params, next epoch, history) from a checkpoint; shapes must match the prepared data."""
    from xpr.em.ptychography.reconstruct import History

    tree = load_tree(path)
    for key in ("object", "probe", "positions"):
        if key not in tree:
            raise InputError(f"checkpoint has no `{key}`", file=path, key="checkpoint.resume_from")
        if tuple(tree[key].shape) != tuple(like[key].shape):
            raise InputError(f"checkpoint `{key}` has shape {list(tree[key].shape)}, the data need "
                             f"{list(like[key].shape)}", file=path, key="checkpoint.resume_from")
    # checkpoints without a defocus (or aberrations, or another list of them) keep the prepared
    def kept(key):
        if key in tree and tuple(np.shape(tree[key])) == tuple(like[key].shape):
            return tree[key]
        return like[key]

    params = {key: be.xp.asarray(kept(key), dtype=like[key].dtype) for key in like}
    history = History(epoch=list(tree["epochs"]), loss=list(tree["loss"]),
                      evaluations=list(tree["evaluations"]), seconds=list(tree["seconds"]),
                      validation=list(tree["validation"]), best_epoch=int(tree["best_epoch"]))
    return params, int(tree["epoch"]), history
