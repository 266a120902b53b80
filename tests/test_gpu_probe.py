import os

import pytest
import torch

from cifar_cnn.gpu_probe import NVML_CHECK, skip_nvml_probe

needs_no_gpu = pytest.mark.skipif(
    not torch.backends.cuda.is_built() or torch.cuda.device_count() > 0,
    reason="the NVML probe is what a CUDA build of torch does on a machine without a GPU",
)


def nvml_probes_of_an_optimizer_step(monkeypatch: pytest.MonkeyPatch) -> int:
    probes = []
    search = torch.cuda._raw_device_count_nvml
    monkeypatch.setattr(torch.cuda, "_raw_device_count_nvml", lambda: probes.append(1) or search())
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    return len(probes)


@needs_no_gpu
def test_without_a_gpu_optimizer_steps_stop_searching_for_nvml(monkeypatch):
    monkeypatch.setenv(NVML_CHECK, "1")  # as importing Lightning sets it
    assert nvml_probes_of_an_optimizer_step(monkeypatch) == 1

    assert skip_nvml_probe()

    assert nvml_probes_of_an_optimizer_step(monkeypatch) == 0
    assert not torch.cuda.is_available()


def test_with_a_gpu_the_check_stays_nvml_based(monkeypatch):
    monkeypatch.setenv(NVML_CHECK, "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    assert not skip_nvml_probe()

    assert os.environ[NVML_CHECK] == "1"


def test_a_check_set_otherwise_is_left_alone(monkeypatch):
    monkeypatch.delenv(NVML_CHECK, raising=False)

    assert not skip_nvml_probe()

    assert NVML_CHECK not in os.environ
