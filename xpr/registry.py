"""Every xpr command, in one table: which worker module runs it and where its runs are archived.

The CLI builds its groups from this table; `--setup_home` copies each command's defaults from it.
A worker module exposes `run(settings, archive) -> dict` and knows nothing of click or the home.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def structure_by_name(settings) -> str:
    """Archive folder of a run: the settings' `structure_name`."""
    return str(settings["structure_name"])


def structure_by_dimension(settings) -> str:
    """xFrame's archive folder `<dims>d_<structure_name>` (fxs)."""
    return f"{settings['dimensions']}d_{settings['structure_name']}"


@dataclass(frozen=True)
class CommandSpec:
    group: str
    name: str
    module: str          # worker module exposing run(settings, archive)
    product: str         # folder under HOME/data/<group>/
    help: str
    structure: Callable = structure_by_name

    @property
    def defaults_relpath(self) -> str:
        return f"{self.group}/{self.name}.yaml"


GROUP_HELP = {
    "fxs": "Fluctuation X-ray scattering: cross-correlations, invariants, single-particle density.",
    "cdi": "Coherent diffraction imaging: ER/HIO/DM/RAAR phasing with shrink-wrap, merged repeats.",
    "em": "Electron imaging: 4D-STEM ptychography and direct methods, TIE, projection alignment.",
}

_fxs = dict(structure=structure_by_dimension)

COMMANDS = (
    CommandSpec("fxs", "simulate_ccd", "xpr.fxs.simulate_ccd", "ccd",
                "Model density -> angular cross-correlation (ccd.h5).", **_fxs),
    CommandSpec("fxs", "simulate_patterns", "xpr.fxs.simulate_patterns", "patterns",
                "Model -> many single-shot diffraction patterns and a pattern list.", **_fxs),
    CommandSpec("fxs", "correlate", "xpr.fxs.correlate", "ccd",
                "Diffraction patterns -> averaged angular cross-correlation (ccd.h5).", **_fxs),
    CommandSpec("fxs", "extract", "xpr.fxs.extract", "invariants",
                "Cross-correlation -> invariants B_l and projection matrices (proj_data.h5).", **_fxs),
    CommandSpec("fxs", "reconstruct", "xpr.fxs.reconstruct", "reconstructions",
                "Invariants -> single-particle densities by iterative phasing.", **_fxs),
    CommandSpec("fxs", "average", "xpr.fxs.average", "averages",
                "Align and average reconstructions; PRTF.", **_fxs),
    CommandSpec("cdi", "simulate", "xpr.cdi.simulate", "simulate",
                "Model object -> diffraction pattern with noise, beamstop and gaps."),
    CommandSpec("cdi", "phase2d", "xpr.cdi.phase2d", "phase2d",
                "Phase a 2-D diffraction pattern: many repeats, merged, PRTF."),
    CommandSpec("cdi", "phase3d", "xpr.cdi.phase3d", "phase3d",
                "Phase a 3-D diffraction volume: many repeats, merged, PRTF."),
    CommandSpec("cdi", "merge", "xpr.cdi.merge", "merge",
                "Merge the repeats of several phase2d/phase3d runs (e.g. array-job shares)."),
    CommandSpec("em", "simulate_4dstem", "xpr.em.ptychography.simulate_4dstem", "simulate_4dstem",
                "Multislice 4D-STEM simulation of a thin specimen."),
    CommandSpec("em", "ptycho", "xpr.em.ptychography.ptycho", "ptycho",
                "Iterative multislice electron ptychography."),
    CommandSpec("em", "dpc", "xpr.em.ptychography.dpc", "dpc",
                "Differential phase contrast: centre of mass, integrated phase."),
    CommandSpec("em", "wdd", "xpr.em.ptychography.wdd", "wdd",
                "Wigner-distribution deconvolution (or single-sideband) ptychography."),
    CommandSpec("em", "tcbf", "xpr.em.ptychography.tcbf", "tcbf",
                "Tilt-corrected bright field with defocus fit."),
    CommandSpec("em", "simulate_focal", "xpr.em.tie.simulate_focal", "simulate_focal",
                "Through-focal series of a specimen (electrostatic and magnetic phase)."),
    CommandSpec("em", "tie", "xpr.em.tie.tie", "tie",
                "Transport-of-intensity phase retrieval with forward-model refinement."),
    CommandSpec("em", "local_ali3d", "xpr.em.ali3d.local_ali3d", "local_ali3d",
                "Local refinement of projection orientations against their 3-D reconstruction."),
)


def groups() -> list[str]:
    return list(dict.fromkeys(spec.group for spec in COMMANDS))


def commands_of(group: str) -> list[CommandSpec]:
    return [spec for spec in COMMANDS if spec.group == group]


def find(group: str, name: str) -> CommandSpec:
    for spec in COMMANDS:
        if spec.group == group and spec.name == name:
            return spec
    raise KeyError(f"{group} {name}")
