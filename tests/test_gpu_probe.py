import os

import pytest
import torch

from cifar_cnn.gpu_probe import NVML_CHECK, skip_nvml_probe

needs_no_gpu = pytest.mark.skipif(
    not torch.backends.cuda.is_built() or torch.cuda.device_count() > 0,
    reason="the NVML probe is what a CUDA build of torch does on a machine without a GPU",
)


@pytest.fixture
def nvml_probes(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry for each time torch counts the GPUs through NVML."""
    probes: list[None] = []
    count = torch.cuda._device_count_nvml
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: probes.append(None) or count())
    return probes


def adam_step() -> None:
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(3, 4)).sum().backward()
    optimizer.step()


@needs_no_gpu
def test_without_a_gpu_optimizer_steps_stop_probing_nvml(
    monkeypatch: pytest.MonkeyPatch, nvml_probes: list[None]
) -> None:
    monkeypatch.setenv(NVML_CHECK, "1")  # as importing Lightning sets it
    adam_step()
    assert nvml_probes

    assert skip_nvml_probe()

    nvml_probes.clear()
    adam_step()
    assert not nvml_probes
    assert not torch.cuda.is_available()


def test_with_a_gpu_the_check_stays_nvml_based(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NVML_CHECK, "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    assert not skip_nvml_probe()

    assert os.environ[NVML_CHECK] == "1"


def test_a_check_set_otherwise_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NVML_CHECK, raising=False)

    assert not skip_nvml_probe()

    assert NVML_CHECK not in os.environ
