"""Everything about a job that can be checked before it runs or is submitted.

A bad value in a sweep of 60 SLURM jobs would otherwise fail 60 times on the cluster:
:func:`preflight_sweep` validates every job of a multirun and :func:`check_job` looks at
what one job needs on disk (image tree, input, weights, a writable output made with this
config), each failing in one line that names the path or key. What a stage needs is
asked of its spec (``part_distillation.stages``), never of its name.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

from part_distillation import stages
from part_distillation.config import ConfigError, RunConfig, validate
from part_distillation.launch.local import OUTPUT_HINT

#: Appended to a data-tree error: what a new user runs instead.
DATA_HINT = ("for the demo run `make demo` (python -m part_distillation experiment=demo); "
             "for your own images give data.root=<folder of class folders>")


class PreflightError(ConfigError):
    """Something a job needs is missing or unusable; found before anything ran. One line."""


def preflight_sweep(config_dir: str, overrides: list[str]) -> int:
    """Validate every job of a multirun, then check what it needs (``check_job``), before anything
    is submitted; return the job count.

    Hydra composes each job's config only inside the job, so a bad value in a sweep of
    60 SLURM jobs would otherwise fail 60 times on the cluster. Each sweep value is
    checked with the other sweeps at their first value (sum, not product, of the sweep
    lengths), which covers per-job values such as ``shard.index=range(0,60)``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed
             if not o.is_sweep_override() and not o.get_key_element().lstrip("+~").startswith("hydra")]
    sweeps = [(o.get_key_element(), list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()]
    firsts = [f"{key}={values[0]}" for key, values in sweeps]
    variants = [firsts]
    for i, (key, values) in enumerate(sweeps):
        variants += [firsts[:i] + [f"{key}={v}"] + firsts[i + 1:] for v in values[1:]]
    jobs = 1
    for _, values in sweeps:
        jobs *= len(values)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        runs = [validate(compose(config_name="config", overrides=fixed + variant)) for variant in variants]
    GlobalHydra.instance().clear()
    for run in runs:  # values first (cheap, they name the key), then what each job needs on disk
        check_job(run)
    return jobs


def check_job(run: RunConfig, pending: tuple[str, ...] = ()) -> None:
    """Everything about one job that can be checked before it is submitted.

    The stage (and a pipeline's stages) exist; the image tree holds images; the input
    (``stage.input``, the previous stage's output) exists; the weights
    file is there; the output folder is writable and, when it exists, was made with this
    config and shard count. Raises :class:`PreflightError` (or ``KeyError`` for an unknown
    stage) with one line naming the path or key.

    ``pending``: folders that jobs submitted before this one will write (a pipeline's
    earlier stages); a file or folder at or under one of them is not required yet.
    """
    def coming(path) -> bool:
        return bool(path) and under_any(str(path), pending)

    spec = stages.spec(run.stage.name)
    if spec.kind == stages.DRIVER:
        for name in run.stage.stages:
            if stages.spec(stages.stage_of(name)).kind == stages.DRIVER:
                raise PreflightError(f"config key 'stage.stages' may not contain '{name}': it runs stages itself")
        return  # each sub-stage is composed and checked when the pipeline reaches it
    if spec.reads_image_tree and not coming(run.data.root):
        from part_distillation.data.imagenet import check_image_tree

        try:
            check_image_tree(run.data.root, split=run.data.split, words_file=run.data.words_file)
        except FileNotFoundError as err:
            raise PreflightError(f"{err}; {DATA_HINT}") from None
        except OSError as err:  # e.g. a folder that cannot be listed
            raise PreflightError(f"image tree {run.data.root} (data.root) cannot be read: {err}") from None
    check_model(run)
    following = getattr(run.stage, "follow", False)  # waits for an input that is still to come
    if (run.stage.input is not None and not following and not coming(run.stage.input)
            and not os.path.isdir(run.stage.input)):
        raise PreflightError(f"input {run.stage.input} (stage.input) does not exist: run the stage that writes "
                             f"it first, or set stage.input=<its output folder>")
    for extra in getattr(run.stage, "extra_inputs", None) or ():  # further record sets trained on with input
        if not following and not coming(extra) and not os.path.isdir(extra):
            raise PreflightError(f"input {extra} (stage.extra_inputs) does not exist: run the stages that write it "
                                 f"on that dataset first, or leave it out of stage.extra_inputs")
    if (spec.uses_weights(run) and run.model.weights and not coming(run.model.weights)
            and not os.path.isfile(run.model.weights)):
        raise PreflightError(f"weights file {run.model.weights} (model.weights) not found: place it there "
                             f"(weights/README.md says where to get it) or set paths.weights=<folder>")
    if not any(coming(path) for path in paths_read(run)):  # a stage's own checks look at its input files
        stages.check(run)
    check_writable(spec.output(run), spec.output_key)
    # the store's check of an existing output (imported here: stages.shard_io loads the image-tree reader)
    from part_distillation.stages.shard_io import output_conflict

    conflict = output_conflict(run)
    if conflict:
        raise PreflightError(conflict)


#: What to choose instead, by network family (configs/model/).
MODEL_CHOICES = {"mask2former": "model=mask2former_swinl (the reference; experiment=in1k/in22k choose it)",
                 "detic": "model=detic_swinb (the reference; experiment=in1k/in22k choose it)"}


def check_model(run: RunConfig) -> None:
    """A job that builds a network has one of the family it needs, and the demo's tiny
    Mask2Former only in ``experiment=demo`` or with ``model.allow_tiny=true`` (without
    ``model=`` a stage would otherwise train the 20-query demo network from scratch)."""
    family = stages.model_needed(run)
    if family is None:
        return
    choice = MODEL_CHOICES[family]
    if run.model.name != family:
        raise PreflightError(f"config key 'model' is {run.model.name!r}: stage {run.stage.name} builds a {family} "
                             f"network; choose {choice}")
    if (family == "mask2former" and run.model.size == "tiny" and run.experiment != "demo"
            and not run.model.allow_tiny):
        raise PreflightError(f"config key 'model.size' is 'tiny' (the demo's 20-query network) outside experiment=demo: "
                             f"choose {choice}, or add model.allow_tiny=true for a small trial")


def check_writable(folder: str, key: str = "stage.output") -> None:
    """``folder`` (or its nearest existing parent, where it will be made) accepts new files."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise PreflightError(f"output folder {folder} ({key}) cannot be made: {path} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".pd_write_check.")
    except OSError as err:
        raise PreflightError(f"output folder {folder} ({key}) is not writable ({path}: "
                             f"{err.strerror or err}): {OUTPUT_HINT}") from None
    os.close(fd)
    os.unlink(probe)


def under_any(path: str, folders) -> bool:
    """``path`` is one of ``folders`` or inside one of them (absolute, normalised paths)."""
    path = os.path.abspath(path)
    for folder in folders:
        folder = os.path.abspath(folder)
        if path == folder or path.startswith(folder.rstrip(os.sep) + os.sep):
            return True
    return False


def paths_read(run: RunConfig) -> list[str]:
    """Every path-like setting a job may read: its stage's strings (output and name aside; a
    ``<kind>:<path>`` entry such as evaluate's ``records:<folder>`` counts as its path),
    ``data.root`` and ``model.weights``."""
    found = [run.data.root, run.model.weights or ""]
    for f in dataclasses.fields(run.stage):
        if f.name in ("name", "output"):
            continue
        value = getattr(run.stage, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and os.sep in item:
                kind, sep, rest = item.partition(":")
                found.append(rest if sep and os.sep not in kind else item)
    return [p for p in found if p]
