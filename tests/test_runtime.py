"""Process settings: the default precision and data path, and no NVML search at every Adam step
without a GPU."""

import os
from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig

import cifar_cnn.runtime
from cifar_cnn.runtime import NVML_CHECK, skip_nvml_probe


@pytest.mark.parametrize(
    ("has_cuda", "avx512_bf16", "amx"),
    [(False, False, False), (False, True, False), (False, False, True), (True, True, True)],
)
def test_the_default_precision_is_bf16_autocast_on_cpus_that_compute_bf16(
    has_cuda: bool,
    avx512_bf16: bool,
    amx: bool,
    monkeypatch: pytest.MonkeyPatch,
    compose_config: Callable[..., DictConfig],
) -> None:
    auto = "cuda" if has_cuda else "cpu"  # what Lightning's accelerator=auto picks
    monkeypatch.setattr(cifar_cnn.runtime, "_select_auto_accelerator", lambda: auto)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    on_cpu = "bf16-mixed" if avx512_bf16 or amx else "32-true"
    assert compose_config().trainer.precision == ("32-true" if has_cuda else on_cpu)
    assert compose_config("trainer=cpu").trainer.precision == on_cpu
    for accelerator in ("cuda", "gpu", "mps", "tpu"):
        composed = compose_config(f"trainer.accelerator={accelerator}")
        assert composed.trainer.precision == "32-true"
    monkeypatch.setattr(cifar_cnn.runtime, "_select_auto_accelerator", lambda: "tpu")
    assert compose_config().trainer.precision == "32-true"  # XLA takes no bf16-mixed
    assert compose_config("trainer=ddp_cpu").trainer.precision == on_cpu
    assert compose_config("trainer.precision=16-mixed").trainer.precision == "16-mixed"


@pytest.mark.parametrize("auto", ["cpu", "cuda", "mps"])
def test_the_data_stays_on_the_device_by_default_on_cpus_only(
    auto: str, monkeypatch: pytest.MonkeyPatch, compose_config: Callable[..., DictConfig]
) -> None:
    """On a CPU slicing batches is the faster; on a GPU the DataLoader is."""
    monkeypatch.setattr(cifar_cnn.runtime, "_select_auto_accelerator", lambda: auto)
    assert compose_config().data.on_device is (auto == "cpu")
    for trainer in ("cpu", "ddp_cpu"):
        assert compose_config(f"trainer={trainer}").data.on_device is True
    for accelerator in ("cuda", "gpu", "mps"):
        assert compose_config(f"trainer.accelerator={accelerator}").data.on_device is False
    assert compose_config("trainer=gpu").data.on_device is False
    assert compose_config("data.on_device=false").data.on_device is False
    assert compose_config("trainer=gpu", "data=cifar10_on_device").data.on_device is True


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
