"""The entry point and its configuration, without SLURM: composition, validation, launchers."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import part_distillation.__main__ as entry
from part_distillation.data.synthetic import make_synthetic_dataset
from part_distillation.config import ConfigError, register_configs, stage_schemas, validate
from tests.helpers import REPO_ROOT, run_entry

STAGE_SCHEMAS = stage_schemas()
STAGES = sorted(STAGE_SCHEMAS)  # index, detic_labeling, ..., part_distillation, and the helpers
EXPERIMENT_DATA = {None: "synthetic_train", "demo": "synthetic_train",
                   "in1k": "imagenet_1k_train", "in22k": "imagenet_22k_train"}

# Our hydra/launcher/submitit_*.yaml extend the plugin's schema of the same name on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")


def _compose(*overrides: str, hydra_config: bool = False):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=entry.config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def test_every_stage_has_a_config_file_and_a_schema():
    stage_files = {p.stem for p in (Path(entry.config_dir()) / "stage").glob("*.yaml")}
    assert stage_files == set(STAGE_SCHEMAS)
    for stage in ("index", "detic_labeling", "pixel_grouping", "dense_crf", "proposal_learning",
                  "part_ranking", "part_distillation"):
        assert stage in STAGE_SCHEMAS


@pytest.mark.parametrize("experiment", list(EXPERIMENT_DATA))
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_and_validates_under_every_experiment(stage, experiment):
    overrides = [f"stage={stage}", "paths.root=/scratch/pd"]
    if experiment:
        overrides.append(f"experiment={experiment}")
    cfg = _compose(*overrides)
    run = validate(cfg)
    assert type(run.stage) is STAGE_SCHEMAS[stage]
    assert run.stage.name == stage
    assert run.experiment == (experiment or "default")
    assert run.data.name == EXPERIMENT_DATA[experiment]
    # every location is resolved and derives from paths.root
    for location in (run.stage.output, run.stage.input, run.data.root):
        if location is not None:
            assert "${" not in location and location.startswith("/scratch/pd/"), location


def test_demo_experiment_runs_the_pipeline_on_the_pretrained_cpu_model():
    run = validate(_compose("experiment=demo"))
    assert run.stage.name == "pipeline" and run.stage.stages[:2] == ["synthetic_data", "index"]
    assert (run.model.name, run.model.size, run.model.device) == ("mask2former", "efficientnet_lite0", "cpu")


@pytest.mark.parametrize("overrides, key", [
    (["shard.count=0"], "shard.count"),
    (["shard.index=-1"], "shard.index"),
    (["shard.index=5", "shard.count=2"], "shard.index"),
    (["shard.by=pixel"], "shard.by"),
    (["stage=pixel_grouping", "stage.num_parts=0"], "stage.num_parts"),
    (["stage=pixel_grouping", "stage.assignment=cosine"], "stage.assignment"),
    (["stage=dense_crf", "stage.gt_prob=1.5"], "stage.gt_prob"),
    (["stage=dense_crf", "stage.gt_prob=-0.1"], "stage.gt_prob"),
    (["stage=dense_crf", "stage.gt_prob=1.0"], "stage.gt_prob"),  # an infinite CRF unary
    (["stage=dense_crf", "stage.gt_prob=0"], "stage.gt_prob"),
    (["stage=part_ranking", "stage.min_area_ratio=2"], "stage.min_area_ratio"),
    (["stage=part_ranking", "stage.batch_size=0"], "stage.batch_size"),
    (["launcher.tasks_per_node=0"], "launcher.tasks_per_node"),
    (["model.device=tpu"], "model.device"),
    (["log_level=LOUD"], "log_level"),
])
def test_validate_rejects_out_of_range_values_naming_the_key(overrides, key):
    cfg = _compose(*overrides)  # composition accepts them: the types are right
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert f"'{key}'" in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["shard.index=1", "shard.count=2"],
    ["stage=dense_crf", "stage.gt_prob=0.999"],
    ["stage=dense_crf", "stage.gt_prob=0.001"],
    ["stage=pixel_grouping", "stage.num_parts=1"],
])
def test_validate_accepts_values_on_the_boundary(overrides):
    validate(_compose(*overrides))


@pytest.mark.parametrize("overrides, key", [
    (["stage.nonexistent=1"], "stage.nonexistent"),
    (["nonexistent=3"], "nonexistent"),
    (["shard.count=abc"], "shard.count"),
    (["stage=pixel_grouping", "stage.num_parts=four"], "stage.num_parts"),
    (["launcher.nodes=1.5"], "launcher.nodes"),
    (["stage.progress_every=[1,2]"], "stage.progress_every"),
])
def test_unknown_keys_and_wrong_types_fail_at_composition(overrides, key):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(*overrides)
    message = f"{err.value} {err.value.__cause__ or ''}"
    assert key in message


def test_unknown_stage_is_refused_listing_the_stages():
    with pytest.raises(Exception) as err:
        _compose("stage=pixel_groupin")
    assert "pixel_grouping" in str(err.value)


@pytest.mark.parametrize("typo, key", [("+stage.num_part=8", "stage.num_part"), ("+foo=1", "foo"),
                                      ("+data.bar.baz=2", "data.bar")])
def test_keys_added_with_plus_that_no_schema_knows_are_refused(typo, key):
    cfg = _compose("stage=pixel_grouping", typo)
    with pytest.raises(ConfigError, match=f"'{key}' is unknown"):
        validate(cfg)


def test_out_of_range_value_is_one_line_without_traceback(tmp_path):
    result = run_entry("shard.count=0", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nothing run: config key 'shard.count' = 0 is invalid" in result.stderr


def test_unknown_stage_is_one_line_and_runs_nothing(tmp_path):
    result = run_entry("stage=part_rankin", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "part_rankin" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "pseudo_labels").exists()


def test_out_of_range_value_exits_non_zero_naming_the_key(tmp_path):
    result = run_entry("shard.count=0", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    assert "'shard.count'" in result.stderr
    assert not (tmp_path / "pseudo_labels").exists()


def test_invalid_multirun_submits_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_entry("-m", "hydra/launcher=submitit_local", "shard.count=2", "shard.index=range(0,3)",
                       f"paths.root={tmp_path}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode != 0
    assert "'shard.index'" in result.stderr
    assert not (sweep / ".submitit").exists()


LAUNCHER_OVERRIDES = {"nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10, "mem_gb": 480,
                      "timeout_min": 4320, "partition": "learnfair", "account": "pd", "qos": "high",
                      "array_parallelism": 64, "max_num_timeout": 5, "signal_delay_s": 300}


def test_submitit_slurm_launcher_takes_its_values_from_launcher_keys():
    cfg = _compose("hydra/launcher=submitit_slurm", "stage=dense_crf", "hydra.sweep.dir=/scratch/pd/sweep",
                   *(f"launcher.{k}={v}" for k, v in LAUNCHER_OVERRIDES.items()), hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # interpolations reach the root
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    for key, value in LAUNCHER_OVERRIDES.items():
        assert launcher[key] == value, key
    assert cfg.hydra.launcher.nodes == 4
    assert launcher["name"] == "pd_dense_crf"
    assert launcher["submitit_folder"] == "/scratch/pd/sweep/.submitit/%j"
    # what the plugin itself sees once Hydra instantiates it
    plugin = instantiate(cfg.hydra.launcher)
    assert type(plugin).__name__ == "SlurmLauncher"
    assert {k: plugin.params[k] for k in LAUNCHER_OVERRIDES} == LAUNCHER_OVERRIDES


def test_launcher_defaults_come_from_configs_launcher_default():
    defaults = OmegaConf.load(Path(entry.config_dir()) / "launcher" / "default.yaml")
    for launcher_name in ("submitit_slurm", "submitit_local"):
        cfg = _compose(f"hydra/launcher={launcher_name}", hydra_config=True)
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        for key, value in defaults.items():
            if key in launcher:
                assert launcher[key] == value, (launcher_name, key)
        assert launcher["name"] == "pd_index"


def test_submitit_local_launcher_takes_its_values_from_launcher_keys():
    cfg = _compose("hydra/launcher=submitit_local", "launcher.tasks_per_node=2", "launcher.cpus_per_task=3",
                   "launcher.timeout_min=7", hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("LocalLauncher")
    assert (launcher["tasks_per_node"], launcher["cpus_per_task"], launcher["timeout_min"]) == (2, 3, 7)


# ------------------------------------------------------------------ checks before submission

def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_missing_data_root_in_a_sweep_exits_2_in_one_line_and_submits_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_entry("-m", "hydra/launcher=submitit_local", "stage=index", "data=in1k", "data.root=/nonexistent",
                       f"paths.root={tmp_path}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "nothing submitted" in line and "/nonexistent" in line and "does not exist" in line
    assert not sweep.exists() and not (tmp_path / "pseudo_labels").exists()


def test_no_arguments_in_an_empty_folder_says_what_to_run(tmp_path):
    result = run_entry(cwd=tmp_path, env={**os.environ, "PD_ROOT": str(tmp_path),
                                          "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "make demo" in line and "data.root=" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_progress_every_zero_is_refused_before_running(tmp_path):
    result = run_entry("stage.progress_every=0", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "'stage.progress_every' = 0 is invalid" in _one_line(result.stderr)
    with pytest.raises(ConfigError, match="stage.progress_every"):
        validate(_compose("stage=pixel_grouping", "stage.progress_every=0"))  # subclasses keep the base check


def test_a_pipeline_with_an_unknown_stage_runs_nothing(tmp_path):
    result = run_entry("stage=pipeline", "stage.stages=[synthetic_data,part_rankin]", f"paths.root={tmp_path}",
                       cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown stage 'part_rankin'" in _one_line(result.stderr)
    assert not (tmp_path / "datasets").exists()


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_tree")
    make_synthetic_dataset(root, num_classes=2, images_per_class=2, size=48, seed=4)
    return root


def test_output_made_with_another_shard_count_or_config_is_refused_before_submission(small_tree, tmp_path):
    first = run_entry("stage=index", f"data.root={small_tree}", f"paths.root={tmp_path}",
                      f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "sweep"
    common = ["-m", "hydra/launcher=submitit_local", "stage=index", f"data.root={small_tree}",
              f"paths.root={tmp_path}", f"hydra.sweep.dir={sweep}"]
    shards = run_entry(*common, "shard.count=2", "shard.index=0,1", cwd=tmp_path)
    assert shards.returncode == 2 and "shard.count=1" in _one_line(shards.stderr)
    config = run_entry(*common, "data.max_pixels=100,200", cwd=tmp_path)
    assert config.returncode == 2 and "data.max_pixels" in _one_line(config.stderr)
    assert not sweep.exists()


@pytest.mark.parametrize("root", ["file", "/proc/pd_output"])
def test_unwritable_output_is_refused_before_running(small_tree, tmp_path, root):
    if root == "file":
        root = tmp_path / "a_file"
        root.write_text("x")
    result = run_entry("stage=index", f"data.root={small_tree}", f"paths.root={root}",
                       f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "stage.output" in line and str(root) in line


def test_missing_weights_are_named_with_their_expected_path(small_tree, tmp_path, monkeypatch):
    from part_distillation import stages
    from part_distillation.launch import PreflightError, check_job

    monkeypatch.setattr(stages, "check", lambda run: None)  # the vocabulary and CLIP files are another test's
    run = validate(_compose("stage=detic_labeling", "model=detic_swinb", f"paths.root={tmp_path}",
                            f"data.root={small_tree}", f"stage.input={tmp_path}"))
    with pytest.raises(PreflightError) as err:
        check_job(run)
    expected = f"{tmp_path}/weights/detic/Detic_LCOCOI21k_CLIP_SwinB_896b32_4x_ft4x_max-size.pth"
    assert expected in str(err.value) and "weights/README.md" in str(err.value)
    Path(expected).parent.mkdir(parents=True)
    Path(expected).write_bytes(b"weights")
    check_job(run)


def test_a_full_disk_inside_a_job_ends_in_one_line_naming_the_file(small_tree, tmp_path):
    args = ["stage=index", f"data.root={small_tree}", f"paths.root={tmp_path}", f"hydra.run.dir={tmp_path}/run"]
    assert run_entry(*args, cwd=tmp_path).returncode == 0
    shards = tmp_path / "pseudo_labels" / "index" / "synthetic_train" / "shards"
    for path in shards.iterdir():
        path.unlink()
    (shards / "00000-of-00001.rec").symlink_to("/dev/full")  # every write: ENOSPC
    result = run_entry(*args, cwd=tmp_path)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert str(shards.parent) in line and "disk is full" in line


def test_errors_of_the_environment_become_one_line_and_bugs_keep_their_traceback(monkeypatch):
    from part_distillation import launch
    from part_distillation.launch import local

    run = validate(_compose("stage=index", "paths.root=/scratch/pd"))
    full = OSError(errno.ENOSPC, "No space left on device", "/scratch/pd/out/shard.rec")
    assert launch.job_error_message(full, run) == ("/scratch/pd/out/shard.rec: the disk is full: free space or "
                                                   "choose another paths.root (or stage.output), then rerun "
                                                   "(finished records are kept)")
    read_only = OSError(errno.EROFS, "Read-only file system", "/scratch/pd/out/manifest.json")
    assert "/scratch/pd/out/manifest.json: the file system is read-only" in launch.job_error_message(read_only, run)
    assert launch.job_error_message(ZeroDivisionError("bug"), run) is None
    from part_distillation.store.errors import EmptyInputError

    empty = EmptyInputError("no training record passes the filters in ['/in'] (3 filtered out)")
    assert launch.job_error_message(empty, run) == "no training record passes the filters in ['/in'] (3 filtered out)"

    def failing_stage(cfg, context):
        raise full

    monkeypatch.setattr(local.stages, "get", lambda name: failing_stage)
    monkeypatch.setattr(local, "configure_logging", lambda level: None)  # leave other tests' log levels alone
    with pytest.raises(launch.JobFailed) as err:
        launch.run_job(_compose("stage=index", "paths.root=/scratch/pd"))
    assert "disk is full" in str(err.value) and err.value.__suppress_context__


def test_in22k_layout_on_an_imagenet_1k_tree_is_refused_naming_the_path_and_setting(small_tree, tmp_path):
    result = run_entry("stage=index", "data=in22k", f"data.root={small_tree}", f"paths.root={tmp_path}",
                       cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert str(small_tree) in line and "data.split=train" in line
    assert not (tmp_path / "pseudo_labels").exists()


def test_a_missing_input_is_named_before_running(tmp_path):
    result = run_entry("stage=evaluate", f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "stage.input" in line and f"{tmp_path}/pseudo_labels/part_labels/proposal_generation_dcrf" in line


def test_multi_line_configuration_errors_are_printed_in_one_line():
    unknown = ValueError("Could not override 'stage.max_pixelz'.\nTo append to your config use +stage.max_pixelz=5\n"
                         "Key 'max_pixelz' not in 'IndexStageConfig'\n    full_key: stage.max_pixelz\n"
                         "    reference_type=StageConfig\n    object_type=IndexStageConfig")
    line = entry.one_line(unknown)
    assert line.startswith("config key 'stage.max_pixelz' is unknown") and "--cfg job" in line and "\n" not in line
    assert entry.one_line(ValueError("Error merging override a=x\nValue 'x' could not be converted")) == (
        "Error merging override a=x; Value 'x' could not be converted")


# The network each stage gets (configs/model/reference/) and the check that refuses a wrong one.
REFERENCE_MODELS = {"proposal_learning": "swinl", "part_distillation": "swinl", "pixel_grouping": "swinl",
                    "part_ranking": "swinl", "supervised_learning": "swinl", "fewshot_learning": "swinl",
                    "detic_labeling": "swinb"}


@pytest.mark.parametrize("experiment", ["in1k", "in22k"])
@pytest.mark.parametrize("stage", STAGES)
def test_reference_experiments_select_each_stages_reference_model(stage, experiment):
    run = validate(_compose(f"stage={stage}", f"experiment={experiment}", "paths.root=/scratch/pd"))
    if stage in REFERENCE_MODELS or stage == "predict":
        family = "detic" if stage in ("detic_labeling", "predict") else "mask2former"
        size = "swinb" if family == "detic" else "swinl"
        assert (run.model.name, run.model.size) == (family, size)
        assert run.model.weights.startswith("/scratch/pd/weights/")  # derived from paths.*
    else:
        assert run.model.name == "none"


def test_a_model_on_the_command_line_still_wins_over_the_experiments_choice():
    run = validate(_compose("stage=proposal_learning", "experiment=in22k", "model=mask2former_tiny"))
    assert (run.model.name, run.model.size) == ("mask2former", "tiny")


def _checked(*overrides: str, tmp_path: Path):
    from part_distillation.launch import check_model

    run = validate(_compose(*overrides, f"paths.root={tmp_path}"))
    check_model(run)
    return run


@pytest.mark.parametrize("stage", ["proposal_learning", "part_distillation", "supervised_learning",
                                   "fewshot_learning"])
def test_the_tiny_model_outside_the_demo_and_no_model_are_refused_naming_the_key(stage, tmp_path):
    from part_distillation.launch import PreflightError

    with pytest.raises(PreflightError, match=r"^config key 'model.size' is 'tiny'.*model.allow_tiny=true"):
        _checked(f"stage={stage}", "experiment=in22k", "model=mask2former_tiny", tmp_path=tmp_path)
    with pytest.raises(PreflightError, match=r"^config key 'model.size' is 'tiny'"):
        _checked(f"stage={stage}", "model=mask2former_tiny", tmp_path=tmp_path)
    with pytest.raises(PreflightError, match=r"^config key 'model' is 'none'.*model=mask2former_swinl"):
        _checked(f"stage={stage}", tmp_path=tmp_path)  # no experiment, no model=
    # the demo, an explicit opt-in, and the reference model pass
    _checked(f"stage={stage}", "experiment=demo", tmp_path=tmp_path)
    _checked(f"stage={stage}", "model=mask2former_tiny", "model.allow_tiny=true", tmp_path=tmp_path)
    _checked(f"stage={stage}", "experiment=in1k", tmp_path=tmp_path)


def test_stages_that_build_a_network_get_one_of_their_family(tmp_path):
    from part_distillation.launch import PreflightError

    with pytest.raises(PreflightError, match=r"^config key 'model' is 'mask2former': .*model=detic_swinb"):
        _checked("stage=detic_labeling", "experiment=in22k", "model=mask2former_swinl", tmp_path=tmp_path)
    with pytest.raises(PreflightError, match=r"^config key 'model' is 'none': stage pixel_grouping"):
        _checked("stage=pixel_grouping", tmp_path=tmp_path)
    _checked("stage=pixel_grouping", "stage.features=efficientnet_lite0", tmp_path=tmp_path)  # builds no Mask2Former
    _checked("stage=detic_labeling", "stage.source=grabcut", tmp_path=tmp_path)
    _checked("stage=part_ranking", tmp_path=tmp_path)  # the stage-4 checkpoint says what it is


def test_training_the_tiny_model_outside_the_demo_exits_2_before_anything_runs(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    result = run_entry("stage=proposal_learning", "model=mask2former_tiny", f"stage.input={records}",
                       f"paths.root={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "nothing run" in line and "config key 'model.size'" in line and "model.allow_tiny=true" in line
    assert not (tmp_path / "outputs").exists()
