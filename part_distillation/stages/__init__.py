"""The stages, each declared once and found by name: the stage registry.

A stage is the module ``part_distillation.stages.<name>`` with
``run(cfg: RunConfig, context: JobContext) -> StageSummary``, an optional
``check(cfg)`` (input files it needs, checked before any job is submitted) and one
``SPEC = StageSpec(...)``: what every other part of the code asks about the stage (its
kind, how it shards, whether it reads the image tree or loads weights, where it writes).
Looking a stage up imports that stage's module only; the entry point, the launcher, the
pipeline and the report never grow a branch per stage.

Where the schemas live: a stage's config schema stays in ``config.py`` (subclass of
``StageConfig`` whose ``name`` default is the stage's name) and its YAML in
``configs/stage/``. Hydra registers and validates every schema before a stage runs, and
``validate`` must not import the stage modules (they pull in torch, the models and the
datasets), so the schemas cannot live in them; the spec names its schema class, and the
list of stage names is the list of those schemas (``config.stage_schemas``), and a stage's
module is ``stages/<name>.py``. Adding a stage is its module (with its ``SPEC``) plus its
schema and YAML: no table to extend. One fact sits on the schema rather than the spec:
which model a training stage's checkpoints hold (``model_kind``), because ``inference``,
below the stages, reads it for a run folder named in its manifest.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from part_distillation.config import StageConfig, stage_schemas

#: Kinds of stage, i.e. how the pipeline runs one and tells that it is complete.
SHARDED = "sharded"  #: writes a record store, one shard file per job of ``shard.index``; complete when every shard closed
TRAINING = "training"  #: trains a model; complete when the final checkpoint (``stage.max_iter``) is there
SINGLE = "single"  #: one job; in a pipeline, complete when its done marker (config fingerprint) is there
DRIVER = "driver"  #: runs other stages (the pipeline); never a stage of a pipeline itself
KINDS = (SHARDED, TRAINING, SINGLE, DRIVER)

PACKAGE = __name__


@dataclass(frozen=True)
class StageSpec:
    """What the code knows about one stage, declared by the stage's own module."""

    name: str
    schema: type[StageConfig]
    kind: str
    #: what ``shard.index`` of ``shard.count`` slices (sharded stages only; said in messages)
    shards_over: str = ""
    #: reads the image tree of ``data`` (checked before submission: root, layout, images)
    reads_image_tree: bool = False
    #: loads ``model.weights`` (checked before submission: the file must exist); a function of
    #: the run where it depends on a setting (stage 1's ``source``, predict's ``mask_source``)
    loads_weights: Union[bool, Callable[[Any], bool]] = False
    #: the config key of the folder the stage writes
    output_key: str = "stage.output"
    #: sharded: a file the last shard writes once every shard is closed (evaluate's merged metrics);
    #: the stage is not complete without it
    merged_file: str | None = None
    #: listed as a stage of its experiment in the report (False: stages that run or describe the others)
    reported: bool = True
    #: the network family (``model.name``) the job builds from ``model.*`` (checked before
    #: submission: the family, and the demo's tiny model only in the demo); a function of the run
    #: where it depends on a setting; None: builds none from there (trained checkpoints are loaded)
    model_family: Union[str, None, Callable[[Any], Optional[str]]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name}: kind {self.kind!r} is not one of {list(KINDS)}")
        if (self.kind == SHARDED) != bool(self.shards_over):
            raise ValueError(f"stage {self.name}: shards_over is said for sharded stages, and only for them")

    def uses_weights(self, run) -> bool:
        """Whether this job loads ``model.weights``."""
        return bool(self.loads_weights(run) if callable(self.loads_weights) else self.loads_weights)

    def model_needed(self, run) -> str | None:
        """The network family this job builds from ``model.*``, or None."""
        return self.model_family(run) if callable(self.model_family) else self.model_family

    def output(self, run) -> str:
        """The folder this job writes (``output_key`` of ``run``)."""
        node = run
        for part in self.output_key.split("."):
            node = getattr(node, part)
        return str(node)


def names() -> list[str]:
    """Every stage, sorted."""
    return sorted(stage_schemas())


def module_of(name: str) -> str:
    """The module of stage ``name`` (``KeyError`` naming the known stages if there is none)."""
    if name not in stage_schemas():
        raise KeyError(f"unknown stage '{name}'; known: {', '.join(names())}")
    return f"{PACKAGE}.{name}"


def _module(name: str):
    return importlib.import_module(module_of(name))


def stage_of(step: str) -> str:
    """The stage a pipeline step runs: ``pixel_grouping@heldout`` -> ``pixel_grouping`` (a stage
    that runs more than once in one pipeline has a step name per run; ``launch.dag``)."""
    return step.partition("@")[0]


def spec(name: str) -> StageSpec:
    """The spec of stage ``name`` (imports that stage's module only)."""
    found = getattr(_module(name), "SPEC", None)
    if not isinstance(found, StageSpec) or found.name != name:
        raise RuntimeError(f"{module_of(name)} declares no SPEC = StageSpec('{name}', ...)")
    return found


def get(name: str) -> Callable:
    """The ``run`` function of stage ``name``."""
    return _module(name).run


def check(run) -> None:
    """Run the stage's own ``check(run)`` if it has one: input files it needs besides the
    weights (vocabulary, annotations, ...), checked before any job is submitted; raises
    ``ConfigError`` naming the key."""
    stage_check = getattr(_module(run.stage.name), "check", None)
    if stage_check is not None:
        stage_check(run)


def loads_weights(run) -> bool:
    """Whether this job loads ``model.weights`` (its stage's ``StageSpec.loads_weights``)."""
    return spec(run.stage.name).uses_weights(run)


def model_needed(run) -> str | None:
    """The network family this job builds from ``model.*`` (its stage's ``StageSpec.model_family``)."""
    return spec(run.stage.name).model_needed(run)


__all__ = ["DRIVER", "KINDS", "SHARDED", "SINGLE", "StageSpec", "TRAINING", "check", "get", "loads_weights",
           "model_needed", "module_of", "names", "spec"]
