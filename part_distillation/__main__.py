"""The one entry point of every stage: ``python -m part_distillation stage=<name> ...``.

Composes ``configs/config.yaml`` (Hydra), then hands the job to the launcher chosen by
``hydra/launcher`` (in-process by default, submitit_local or submitit_slurm).
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from part_distillation.config import ConfigError, config_dir, register_configs

register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from part_distillation.launch import JobFailed, run_job

    try:
        return run_job(cfg)
    except JobFailed as failed:
        if HydraConfig.get().mode != RunMode.RUN:
            raise  # a multirun job: Hydra reports it (in one line: a compact exception)
        print(failed, file=sys.stderr)  # in-process: one line, the traceback is in the log at DEBUG
        sys.exit(1)


PREDICT_USAGE = ("usage: python -m part_distillation predict <image file or folder> <run folder or checkpoint> "
                 "[overrides, e.g. stage.mask_source=grabcut stage.object_class=dog]")


def _override_value(text: str) -> str:
    """``text`` as a Hydra override value: quoted unless it is plain (paths with spaces, commas...)."""
    if text and all(c.isalnum() or c in "_./-~+" for c in text):
        return text
    return "'" + text.replace("'", "\\'") + "'"


def expand_predict(args: list[str]) -> list[str]:
    """``predict <images> <checkpoint> [overrides]`` -> ``stage=predict stage.images=... stage.checkpoint=...``
    (other arguments unchanged)."""
    if args[:1] != ["predict"]:
        return args
    if len(args) < 3 or any("=" in a or a.startswith("-") for a in args[1:3]):
        print(PREDICT_USAGE, file=sys.stderr)
        sys.exit(2)
    return ["stage=predict", f"stage.images={_override_value(args[1])}",
            f"stage.checkpoint={_override_value(args[2])}", *args[3:]]


_DETAIL_LINES = ("full_key:", "reference_type=", "object_type=")


def one_line(err: BaseException) -> str:
    """A configuration error in one line: Hydra's and OmegaConf's multi-line messages
    (an unknown key says where to look, not to append it with ``+``) joined."""
    message = str(err).strip()
    if err.__cause__ is not None and str(err.__cause__) not in message:
        message += f"\n{err.__cause__}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    if full_key and any(line.startswith("Key '") and " not in " in line for line in lines):
        return (f"config key '{full_key}' is unknown: no schema has it (a typo? `python -m part_distillation "
                f"--cfg job stage=<name>` shows the keys)")
    return "; ".join(line for line in lines if not line.startswith(_DETAIL_LINES))


def main() -> None:
    """Check the whole configuration (every job of a sweep) first, then hand over to Hydra.

    A bad value is reported in one line, naming the key, before anything runs or is
    submitted. Runs with other Hydra flags (``--cfg``, ``--help``, ``-cn``) skip the check.
    ``predict <images> <checkpoint> [overrides]`` is short for the predict stage's overrides.
    """
    sys.argv[1:] = expand_predict(sys.argv[1:])
    args = sys.argv[1:]
    flags = {a for a in args if a.startswith("-")}
    if flags <= {"-m", "--multirun"}:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from part_distillation.launch import preflight_sweep

        try:
            preflight_sweep(config_dir(), [a for a in args if a not in flags])
        except (ConfigError, KeyError, HydraException, OmegaConfBaseException) as err:
            print(f"part_distillation: nothing {'submitted' if flags else 'run'}: {one_line(err)}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
