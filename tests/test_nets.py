import torch
import torch.nn.functional as F

from cifar_cnn.nets import TutorialCNN


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
