"""One road from settings to numerics (xpr.options): every options class takes its defaults from
the documented defaults file, so the object a worker builds from the resolved defaults equals
the class's own defaults; none of its plain fields restates a documented key; options and
resolved settings travel into worker processes unchanged (pickle); `-o` reaches them."""
from __future__ import annotations

import dataclasses
import importlib
import pickle
import pkgutil

import numpy as np
import pytest

import xpr
from xpr import options as options_module
from xpr import resources
from xpr.settings import resolve


def _options_classes():
    """Every class made by @options in xpr (found by importing each module)."""
    found = {}
    for module in pkgutil.walk_packages(xpr.__path__, "xpr."):
        try:
            loaded = importlib.import_module(module.name)
        except ImportError:          # optional dependencies (torch, dask-jobqueue, ...)
            continue
        for value in vars(loaded).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and hasattr(value, "xpr_command") \
                    and value.__module__ == loaded.__name__:
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


CLASSES = _options_classes()


def _documented_leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict) and value and "command" not in value:
            yield from _documented_leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


def _resolved_defaults(group, command, overrides=()):
    if group is None:                 # the keys every command shares, as `cdi phase2d` resolves them
        group, command = "cdi", "simulate"
    path = resources.defaults_dir() / group / f"{command}.yaml"
    return resolve(group, command, str(path), None, list(overrides)).settings


def test_the_options_classes_are_found():
    # the commands whose numerics take an options object (a new one is found by the same walk)
    names = {name.rsplit(".", 1)[-1] for name in CLASSES}
    assert {"Options", "PhasingOptions", "PhasingOptions3D", "RealSpaceOptions", "SpreadOptions",
            "ClusterOptions", "GpuOptions", "Ali3dOptions", "DetectorProcessing"} <= names


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_defaults_are_the_documented_ones(name):
    cls = CLASSES[name]
    group, command = cls.xpr_command
    required = {f.name: 7.0 for f in dataclasses.fields(cls)        # derived values without a default
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    defaults = cls(**required)
    plain = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls) if options_module.SETTING not in f.metadata}
    built = cls.from_settings(_resolved_defaults(group, command), **plain)
    for field in dataclasses.fields(cls):
        ours, documented = getattr(built, field.name), getattr(defaults, field.name)
        assert np.array_equal(ours, documented) if isinstance(ours, np.ndarray) else ours == documented, field.name
    # the settings fields really are documented keys of that command
    leaves = {".".join(leaf) for leaf in _documented_leaves(options_module.documented_defaults(group, command))}
    for field, key in options_module.setting_fields(cls).items():
        assert key in leaves, f"{name}.{field} reads '{key}', which {group} {command} does not document"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_no_plain_field_restates_a_documented_key(name):
    """A field that is not a setting must not carry a default for a key the defaults file gives
    a value to (that default would be a second copy, free to drift, as ptycho's probe_from_epoch
    did: 0 in the code, 2 in the defaults file). Derived values without a default (local_ali3d's
    ou, resolved against the box) or for keys documented as null (found in the data) may stay.
    Checked within the blocks the class reads its settings from."""
    cls = CLASSES[name]
    settings_fields = options_module.setting_fields(cls)
    blocks = {key.split(".")[0] for key in settings_fields.values()}     # the blocks the class reads
    tree = options_module.documented_defaults(*cls.xpr_command)
    documented = {leaf[-1] for leaf in _documented_leaves(tree)
                  if leaf[0] in blocks and options_module.lookup(tree, ".".join(leaf)) is not None}
    restated = [f.name for f in dataclasses.fields(cls) if f.name not in settings_fields and f.name in documented
                and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)]
    assert not restated, f"{name}: {restated} restate documented keys; make them setting(...) fields"


def test_an_override_reaches_the_options_and_both_pickle():
    from xpr.em.ptychography.reconstruct import Options

    settings = _resolved_defaults("em", "ptycho", ["reconstruction.epochs=7",
                                                    "reconstruction.refine.probe_from_epoch=4"])
    built = Options.from_settings(settings)
    assert (built.epochs, built.probe_from_epoch) == (7, 4)
    assert Options().probe_from_epoch == 2         # the documented default, not a code copy
    assert pickle.loads(pickle.dumps(built)) == built
    again = pickle.loads(pickle.dumps(settings))     # resolved settings travel to worker processes
    assert again == settings and again.reconstruction.epochs == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.epochs = 3
    with pytest.raises(TypeError):
        settings.reconstruction.epochs = 3


def test_a_setting_field_must_name_a_documented_key():
    with pytest.raises(TypeError, match="not documented"):
        @options_module.options("em", "ptycho")
        class Wrong:
            epochs: int = options_module.setting("reconstruction.epoch")


def test_conversions_apply_to_defaults_and_settings():
    from xpr.cdi.phasing import PhasingOptions, PhasingOptions3D

    settings = _resolved_defaults("cdi", "phase3d", ["phasing_parameters.shrink_wrap.threshold=[0.2, 0.1]",
                                                      "phasing_parameters.voxel_number=5000"])
    built = PhasingOptions3D.from_settings(settings)
    assert built.sw_threshold == 0.1 and built.support_size == 5000   # the last of a ramp; voxels in 3-D
    assert PhasingOptions().sw_sigma == (3.0, 1.0)                     # lists become tuples


def test_a_partial_block_is_completed_by_the_documented_defaults():
    from xpr.parallel import ClusterOptions, jobqueue_options

    cluster = ClusterOptions.from_block({"cores": 16, "memory": "8GB"})
    assert (cluster.cores, cluster.memory, cluster.jobs, cluster.walltime) == (16, "8GB", 2, "01:00:00")
    assert jobqueue_options({"cores": 16})["memory"] == ClusterOptions().memory == "4GB"


@pytest.mark.parametrize("command", ["dpc", "wdd", "tcbf"])
def test_the_shared_experiment_block_is_documented_alike(command):
    """calibration.DetectorProcessing reads ptycho's defaults; the direct methods document the
    same values, so a partial experiment mapping is completed the same way for all four."""
    from xpr.em.ptychography.calibration import DetectorProcessing

    assert DetectorProcessing.from_settings(_resolved_defaults("em", command)) == DetectorProcessing()
