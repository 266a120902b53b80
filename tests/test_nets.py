"""The nets: the tutorial's CNN to the bit, ResNet-18 and WideResNet for CIFAR."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchvision.models.resnet import BasicBlock

from cifar_cnn.module import ImageClassifier
from cifar_cnn.nets import CifarResNet, TutorialCNN, WideResNet
from cifar_cnn.training import train


def test_tutorial_cnn_has_the_keras_parameter_count() -> None:
    assert sum(p.numel() for p in TutorialCNN().parameters()) == 315_722


def test_tutorial_cnn_maps_images_to_logits() -> None:
    net = TutorialCNN()
    logits = net(torch.rand(8, 3, 32, 32))
    assert logits.shape == (8, 10)
    assert logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_tutorial_cnn_layers_follow_the_config() -> None:
    net = TutorialCNN(num_classes=5, conv_channels=(16, 32, 64), hidden_units=64, dropout=0.5)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    # 32 -> conv 30 -> pool 15 -> conv 13 -> pool 6 -> conv 4 -> pool 2: 64 * 2 * 2 features.
    assert net.head[1].in_features == 256
    assert net.head[3].p == 0.5


def test_tutorial_cnn_pooling_before_relu_is_the_tutorial_order_to_the_bit() -> None:
    torch.manual_seed(0)
    net = TutorialCNN(dropout=0.0)
    conv1, conv2 = net.features[0], net.features[3]
    hidden, output = net.head[1], net.head[4]

    def tutorial(images: torch.Tensor) -> torch.Tensor:  # conv, ReLU, then pool
        x = F.max_pool2d(F.relu(conv1(images)), 2)
        x = F.max_pool2d(F.relu(conv2(x)), 2)
        return output(F.relu(hidden(x.flatten(1))))

    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    gradients = []
    for forward in (net, tutorial):
        net.zero_grad()
        logits = forward(images)
        F.cross_entropy(logits, labels).backward()
        gradients.append([logits.detach()] + [p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*gradients, strict=True))


def test_resnet18_for_cifar_has_torchvisions_blocks_and_a_small_image_stem() -> None:
    net = CifarResNet()
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert all(isinstance(block, BasicBlock) for block in net.layer4)


@pytest.mark.parametrize(("depth", "width", "count"), [(16, 8, 10_961_370), (28, 10, 36_479_194)])
def test_wide_resnet_sizes(depth: int, width: int, count: int) -> None:
    net = WideResNet(depth=depth, width=width)
    assert sum(p.numel() for p in net.parameters()) == count
    with pytest.raises(ValueError, match="depth=20"):
        WideResNet(depth=20)


@pytest.mark.slow  # a few seconds a batch on two cores
@pytest.mark.parametrize(
    ("option", "precision", "narrower"),
    [
        ("resnet18", "32-true", []),
        ("wide_resnet", "32-true", []),
        # bf16 autocast is emulated, slowly, on CPUs without bf16 instructions: the same
        # code, fewer channels.
        ("resnet18", "bf16-mixed", ["model.net.blocks=[1,1,1,1]"]),
        ("wide_resnet", "bf16-mixed", ["model.net.width=2"]),
    ],
)
def test_standard_nets_train_two_batches_and_reload_weights_only(
    option: str, precision: str, narrower: list[str], compose_config: Callable[..., DictConfig],
    tiny_data_dir: Path,
) -> None:  # fmt: skip
    """channels_last (the configs' layout), bf16 autocast, a weights-only checkpoint that
    load_from_checkpoint rebuilds to the same logits."""
    cfg = compose_config(
        f"model={option}", *narrower, f"data.data_dir={tiny_data_dir}", "data.batch_size=8",
        "data.eval_batch_size=8", "trainer.accelerator=cpu", f"trainer.precision={precision}",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "logger.tensorboard=null",
    )  # fmt: skip
    assert cfg.model.channels_last
    metrics = train(cfg)
    checkpoint = Path(metrics["best_checkpoint"])
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2
    model = ImageClassifier.load_from_checkpoint(checkpoint, weights_only=True).eval()
    images = torch.rand(4, 3, 32, 32)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    again = ImageClassifier(**model.hparams).eval()
    again.load_state_dict(state)
    assert torch.equal(model(images), again(images))
