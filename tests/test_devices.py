import pytest
import torch

from part_distillation.devices import DeviceError, resolve_device


def test_auto_follows_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_explicit_cuda_without_a_gpu_names_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for setting in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=r"config key 'model\.device' = 'cuda.*no GPU is visible"):
            resolve_device(setting)
    with pytest.raises(ValueError, match="'stage.device'"):
        resolve_device("cuda", key="stage.device")


def test_cpu_devices_and_bad_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(DeviceError, match="'model.device' = 'tpu'"):
        resolve_device("tpu")


def test_local_rank_spreads_processes_over_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")


def test_a_device_error_is_a_config_error_printed_as_one_line():
    from part_distillation.config import ConfigError

    assert issubclass(DeviceError, ConfigError)  # the entry point prints ConfigError without a traceback
