"""The fast recipe: data kept on the device, FastCNN, and what ImageClassifier adds for them."""

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import Precision
from omegaconf import DictConfig
from torch import nn

from cifar_cnn.callbacks import Lookahead, StoppedBySignal, WhitenStem
from cifar_cnn.checkpoints import load_checkpoint
from cifar_cnn.data import CIFAR10DataModule, DeviceBatches, epoch_order
from cifar_cnn.errors import UserError
from cifar_cnn.module import ImageClassifier, TriangularLR
from cifar_cnn.nets import FastCNN, SeedCNN
from cifar_cnn.training import build, train

from .conftest import compose_in


def ready(data_dir: Path, cache_dir: Path, **kwargs) -> CIFAR10DataModule:
    datamodule = CIFAR10DataModule(data_dir, cache_dir, **kwargs)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def tiny_fast_run(tiny_data_dir: Path) -> list[str]:
    """experiment=fast for two epochs on the tiny data set, with a narrower net."""
    return [
        "experiment=fast", f"data.data_dir={tiny_data_dir}", "data.batch_size=16",
        "data.eval_batch_size=16", "model.net.widths=[8,16,16]", "trainer.accelerator=cpu",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "logger.tensorboard=null",
    ]  # fmt: skip


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
    return list(loader)


@pytest.mark.parametrize("drop_last", [False, True])
def test_device_path_and_dataloader_give_the_same_batches(
    drop_last: bool, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """80 training images in batches of 24: three full batches and a last one of 8."""
    settings = dict(batch_size=24, shuffle_seed=3, drop_last=drop_last, flip=True, crop_padding=2)
    loader = ready(tiny_data_dir, tmp_path / "cache", **settings)
    device = ready(tiny_data_dir, tmp_path / "cache", on_device=True, **settings)
    on_device = device.train_dataloader()
    assert isinstance(on_device, DeviceBatches)
    assert len(on_device) == len(loader.train_dataloader()) == (3 if drop_last else 4)
    for epoch in (0, 1):
        expected = epoch_batches(loader.train_dataloader(), epoch)
        batches = epoch_batches(on_device, epoch)
        assert [len(labels) for _, labels in batches] == [24, 24, 24] + ([] if drop_last else [8])
        for (images, labels), (same_images, same_labels) in zip(expected, batches, strict=True):
            assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
            augmented = []
            for datamodule, batch in ((loader, (images, labels)), (device, (same_images, labels))):
                datamodule.trainer = SimpleNamespace(training=True, precision_plugin=Precision())
                torch.manual_seed(epoch)  # the augmentation draws alike too
                augmented.append(datamodule.on_after_batch_transfer(batch, 0)[0])
                datamodule.trainer = None
            assert torch.equal(augmented[0], augmented[1])
    first, second = (epoch_batches(on_device, epoch)[0][1] for epoch in (0, 1))
    assert not torch.equal(first, second)  # a new order every epoch


@pytest.mark.parametrize("on_device", [False, True])
def test_evaluation_batches_are_in_order_and_keep_the_last_partial_one(
    on_device: bool, tiny_data_dir: Path, tmp_path: Path
) -> None:
    datamodule = ready(
        tiny_data_dir, tmp_path / "cache", on_device=on_device, eval_batch_size=16, drop_last=True
    )
    batches = list(datamodule.test_dataloader())
    assert [len(labels) for _, labels in batches] == [16, 16, 8]
    assert torch.equal(torch.cat([images for images, _ in batches]), datamodule.data_test.images)
    val = [len(labels) for _, labels in datamodule.val_dataloader()]
    assert val == [16, 4]  # 20 of the 100 training images


@pytest.mark.parametrize("on_device", [False, True])
def test_processes_train_on_equal_disjoint_shares_and_evaluate_each_image_once(
    on_device: bool, tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Three processes: 80 training images give each 26 (two sit out the epoch); the 40
    test images are evaluated once over all of them."""
    training, testing = [], []
    for rank in range(3):
        datamodule = ready(tiny_data_dir, tmp_path / "cache", on_device=on_device, batch_size=8)
        datamodule.trainer = SimpleNamespace(
            global_rank=rank, world_size=3, training=False,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )  # fmt: skip
        training.append(torch.cat([images for images, _ in datamodule.train_dataloader()]))
        testing.append(torch.cat([images for images, _ in datamodule.test_dataloader()]))

    assert [len(images) for images in training] == [26, 26, 26]
    trained = {image.numpy().tobytes() for images in training for image in images}
    assert len(trained) == 78  # no image in two shares
    tested = sorted(image.numpy().tobytes() for images in testing for image in images)
    assert tested == sorted(image.numpy().tobytes() for image in datamodule.data_test.images)


def test_epoch_order_depends_on_seed_and_epoch_alone() -> None:
    order = epoch_order(100, seed=42, epoch=3)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, epoch_order(100, seed=42, epoch=3))
    others = [epoch_order(100, 42, 4), epoch_order(100, 43, 3), epoch_order(100, 43, 2)]
    assert all(not torch.equal(order, other) for other in others)


def test_the_shuffle_seed_defaults_to_the_run_seed(tiny_data_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(7)  # what seed_everything(7) does to torch
    sampler = ready(tiny_data_dir, tmp_path / "cache").train_dataloader().sampler
    assert sampler.seed == 7
    assert list(sampler) == epoch_order(80, seed=7, epoch=0).tolist()


def test_augmented_device_batches_keep_shape_type_and_range(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    datamodule = ready(tiny_data_dir, tmp_path / "cache", on_device=True, flip=True, crop_padding=4)
    images, labels = next(iter(datamodule.train_dataloader()))
    datamodule.trainer = SimpleNamespace(training=True, precision_plugin=Precision())
    floats, same_labels = datamodule.on_after_batch_transfer((images, labels), 0)
    assert floats.shape == images.shape == (64, 3, 32, 32) and floats.dtype == torch.float32
    assert floats.min() >= 0.0 and floats.max() <= 1.0
    assert same_labels is labels and labels.dtype == torch.int64


def test_fast_cnn_has_airbench_size_and_maps_images_to_logits() -> None:
    net = FastCNN()
    assert sum(p.numel() for p in net.parameters()) == 1_972_792
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == 2 * (64 + 256 + 256)  # the BatchNorm scales
    logits = net(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 10) and logits.dtype == torch.float32
    assert FastCNN(num_classes=5, widths=(8, 16, 32))(torch.rand(2, 3, 32, 32)).shape == (2, 5)


FAST_NET = {"_target_": "cifar_cnn.nets.FastCNN", "widths": [8, 16, 16]}
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "weight_decay": 1e-3}


def test_flip_tta_averages_an_image_with_its_mirror_in_eval_mode() -> None:
    model = ImageClassifier(FAST_NET, SGD, flip_tta=True, channels_last=True).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(model(images), model(images.flip(3)), atol=1e-6)
        plain = model.net(images)
        assert torch.allclose(model(images), (plain + model.net(images.flip(3))) / 2, atol=1e-6)
    model.train()
    assert not torch.allclose(model(images), model(images.flip(3)))


def test_translate_tta_adds_the_image_shifted_a_pixel_either_way() -> None:
    model = ImageClassifier(FAST_NET, SGD, flip_tta=True, translate_tta=True).eval()
    images = torch.rand(2, 3, 32, 32)

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return (model.net(x) + model.net(x.flip(3))) / 2

    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    with torch.inference_mode():
        shifted = mirrored(padded[:, :, :32, :32]) + mirrored(padded[:, :, 2:, 2:])
        assert torch.allclose(model(images), mirrored(images) / 2 + shifted / 4, atol=1e-6)
    model.train()
    assert torch.equal(model(images), model.net(images))  # training sees the image alone


def test_the_whitened_stem_decorrelates_image_patches_and_stays_frozen() -> None:
    torch.manual_seed(0)
    # Smooth images: neighbouring pixels and channels are strongly correlated.
    images = F.interpolate(torch.rand(64, 3, 8, 8), size=32, mode="bilinear")
    net = FastCNN()
    net.whiten_stem(images)
    filters = net.stem.weight[:12]  # the other 12 are their negatives
    assert torch.equal(net.stem.weight[12:], -filters)
    seen = {}  # what the stem makes of the images inside forward, and what the stages get
    net.stem.register_forward_hook(lambda module, args, output: seen.update(stem=output))
    net.stages.register_forward_pre_hook(lambda module, args: seen.update(stages=args[0]))
    with torch.no_grad():
        net.eval()(images)
    assert torch.equal(seen["stages"], F.gelu(seen["stem"]))
    features = seen["stem"][:, :12].transpose(0, 1).flatten(1)  # the whitened patches
    second_moment = features @ features.T / features.shape[1]
    off_diagonal = second_moment - torch.diag(second_moment.diag())
    assert off_diagonal.abs().max() < 1e-3  # decorrelated
    assert (second_moment.diag() <= 1 + 1e-4).all() and second_moment.diag()[0] > 0.99
    assert not net.stem.weight.requires_grad and net.stem.bias.requires_grad
    assert torch.equal(net.stem.bias, torch.zeros(24))
    with pytest.raises(ValueError, match="stem_channels=24"):
        FastCNN(stem_channels=16).whiten_stem(images)


def test_whiten_stem_names_a_net_it_cannot_whiten() -> None:
    trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(UserError, match="callbacks.whiten_stem .* SeedCNN has none"):
        WhitenStem().setup(trainer, SimpleNamespace(net=SeedCNN()), "fit")


def test_lookahead_pulls_weights_to_their_average_and_ends_on_it() -> None:
    net = nn.Linear(1, 1, bias=False)
    module = SimpleNamespace(net=net)
    trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=0)
    lookahead = Lookahead(every_n_steps=5, final_decay=0.5)

    def step_to(step: int, weight: float) -> float:
        trainer.global_step = step
        with torch.no_grad():
            net.weight.fill_(weight)
        lookahead.on_train_batch_end(trainer, module, None, None, 0)
        return net.weight.item()

    with torch.no_grad():
        net.weight.fill_(0.0)
    lookahead.on_train_start(trainer, module)  # the average starts at the weights: 0
    assert step_to(3, 1.0) == 1.0  # not a lookahead step
    # decay 0.5 * (5 / 10) ** 3 = 0.0625: the average moves 93.75% of the way to 1
    assert step_to(5, 1.0) == pytest.approx(0.9375)
    saved = lookahead.state_dict()
    resumed = Lookahead(every_n_steps=5, final_decay=0.5)
    resumed.load_state_dict(saved)
    assert resumed._average[0].item() == pytest.approx(0.9375)
    # The last step: the usual move (decay 0.5), then the weights become the average.
    assert step_to(10, 3.0) == pytest.approx(0.9375 / 2 + 3.0 / 2)
    trainer.estimated_stepping_batches = 7
    lookahead.on_train_start(trainer, module)
    assert step_to(7, 5.0) == pytest.approx(0.9375 / 2 + 3.0 / 2)  # no move, it becomes it


def test_lookahead_moves_once_per_optimizer_step() -> None:
    """With accumulate_grad_batches, batches of a window share a global step: before the
    first step (0), then three batches at step 5."""
    net = nn.Linear(1, 1, bias=False)
    module = SimpleNamespace(net=net)
    trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=0)
    lookahead = Lookahead(every_n_steps=5, final_decay=0.5)
    with torch.no_grad():
        net.weight.fill_(0.0)
    lookahead.on_train_start(trainer, module)
    for step in (0, 0, 5, 5, 5):
        trainer.global_step = step
        with torch.no_grad():
            net.weight.fill_(1.0)
        lookahead.on_train_batch_end(trainer, module, None, None, 0)
    assert lookahead._average[0].item() == pytest.approx(0.9375)  # one move from 0 (decay 1/16)


def test_the_stem_bias_stops_learning_after_its_epochs() -> None:
    module = SimpleNamespace(net=FastCNN(widths=(8, 16, 16)))
    bias = module.net.stem.bias
    whiten = WhitenStem(bias_epochs=3)
    for epoch, kept in ((2, True), (3, False)):
        bias.grad = torch.ones_like(bias)
        whiten.on_before_optimizer_step(SimpleNamespace(current_epoch=epoch), module, None)
        assert (bias.grad is not None) == kept
    assert bias.requires_grad  # DDP needs its parameters' gradients to keep coming


def test_norm_biases_get_a_scaled_rate_and_the_same_decay_per_step() -> None:
    model = ImageClassifier(FAST_NET, SGD, norm_bias_lr_scale=64)
    others, biases = model.configure_optimizers().param_groups
    assert (others["lr"], others["weight_decay"]) == (0.1, 1e-3)
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(1e-3 / 64)
    assert len(biases["params"]) == 6  # two BatchNorms in each of three stages
    assert len(others["params"]) + len(biases["params"]) == len(list(model.parameters()))


def test_triangular_schedule_rises_then_falls_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    optimizer.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 10.0})
    schedule = TriangularLR(optimizer, total_steps=10, peak_fraction=0.2, start_factor=0.2)
    rates = []
    for _ in range(10):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    assert [a for a, _ in rates] == pytest.approx([0.2, 0.6, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                   0.25, 0.125])  # fmt: skip
    assert all(b == pytest.approx(10 * a) for a, b in rates)
    assert optimizer.param_groups[0]["lr"] == 0.0
    schedule = TriangularLR(optimizer, total_steps=10, peak_fraction=0.2, end_factor=0.1)
    for _ in range(10):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # falls to end_factor


def test_label_smoothing_applies_to_the_training_loss_only() -> None:
    model = ImageClassifier(FAST_NET, SGD, label_smoothing=0.2)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    model.trainer = SimpleNamespace(
        log_every_n_steps=0,
        num_training_batches=10,
        global_step=0,
        max_steps=-1,
        accumulate_grad_batches=1,
    )
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    logits = model.eval()(images)  # eval mode: the same logits for both steps
    model.validation_step((images, labels), 0)
    assert torch.allclose(model.val_loss.compute(), F.cross_entropy(logits, labels))
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2)
    model.on_train_epoch_start()  # as Lightning calls it before an epoch's steps
    assert torch.allclose(model.training_step((images, labels), 0), smoothed)


def test_fast_experiment_composes_and_builds(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config("experiment=fast")
    assert (cfg.data.batch_size, cfg.data.on_device, cfg.trainer.max_epochs) == (1024, True, 10)
    datamodule, model, _ = build(cfg)
    assert datamodule.hparams.on_device and isinstance(model.net, FastCNN)
    assert model.hparams.label_smoothing == 0.2 and model.hparams.flip_tta
    assert model.hparams.translate_tta and cfg.data.val_fraction == 0.02
    assert cfg.callbacks.whiten_stem and cfg.callbacks.lookahead
    assert cfg.callbacks.model_checkpoint.monitor is None  # the last weights are the result


def test_the_fast_recipe_lowers_the_loss_of_a_fixed_batch(
    compose_config: Callable[..., DictConfig],
) -> None:
    torch.manual_seed(0)
    model = instantiate(compose_config("experiment=fast").model)
    optimizer = instantiate(model.hparams.optimizer)(params=model.parameters())
    images, labels = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_the_fast_experiment_trains_tests_and_resumes_exactly_on_the_cpu(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """Two epochs of the whole recipe on the tiny data, with a narrower net; then the second
    epoch again, resumed from the first one's checkpoint, to the same weights."""
    overrides = tiny_fast_run(tiny_data_dir)
    full = compose_config(*overrides, "+callbacks.model_checkpoint.save_top_k=-1")
    metrics = train(full)
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert 0 <= metrics["test/acc"] <= 1

    checkpoints = Path(full.paths.output_dir) / "checkpoints"
    resumed = compose_config(*overrides)
    L.seed_everything(resumed.seed, workers=True)
    datamodule, model, trainer = build(resumed)
    trainer.fit(model, datamodule, ckpt_path=checkpoints / "epoch_000.ckpt", weights_only=True)
    expected = torch.load(checkpoints / "last.ckpt", weights_only=True)["state_dict"]
    assert expected.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_fast_run_stopped_at_a_lookahead_step_resumes_exactly_into_linked_checkpoints(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path, cache_dir: Path
) -> None:
    """Stopped at step 5 of the first epoch (6 steps), where Lookahead pulls the weights: the
    stop saves after the pull. The stop's last.ckpt is a file; the resumed run's link
    replaces it (no last-v1.ckpt, which a later resume would not read)."""
    interrupt = ["+callbacks.interrupt._target_=tests.test_resume.InterruptAtStep",
                 "+callbacks.interrupt.step=5"]  # fmt: skip
    stopped = compose_config(*tiny_fast_run(tiny_data_dir), *interrupt)
    with pytest.raises(StoppedBySignal, match="at step 5 \\(epoch 0\\)"):
        train(stopped)
    folder = Path(stopped.paths.output_dir)
    resumed = [*tiny_fast_run(tiny_data_dir), f"ckpt_path={folder}"]
    assert train(compose_in("train", resumed, folder, cache_dir))["status"] == "completed"
    checkpoints = folder / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch_001.ckpt", "last.ckpt"]
    assert (checkpoints / "last.ckpt").resolve() == checkpoints / "epoch_001.ckpt"
    full = compose_config(*tiny_fast_run(tiny_data_dir))
    train(full)
    expected = torch.load(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt",
                          weights_only=True)["state_dict"]  # fmt: skip
    got = torch.load(checkpoints / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, got[key]) for key, value in expected.items())


def test_the_fast_experiment_writes_one_checkpoint_an_epoch(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """last.ckpt is a link to the last epoch's checkpoint, not a second copy; that checkpoint
    is the one tested, and its weights give the reported test accuracy again."""
    cfg = compose_config(*tiny_fast_run(tiny_data_dir))
    metrics = train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch_001.ckpt", "last.ckpt"]
    assert (checkpoints / "last.ckpt").resolve() == checkpoints / "epoch_001.ckpt"
    assert metrics["best_checkpoint"] == str(checkpoints / "epoch_001.ckpt")

    model = ImageClassifier.load_from_checkpoint(
        checkpoints / "last.ckpt", map_location="cpu", weights_only=True
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    [retested] = trainer.test(model, instantiate(cfg.data), verbose=False)
    assert retested["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow  # compiling takes about a minute
def test_the_fast_experiment_trains_compiled_in_bf16_and_its_checkpoint_loads_eager(
    compose_config: Callable[..., DictConfig], tiny_data_dir: Path
) -> None:
    """With a global `amax` in FastCNN, inductor's backward under bf16 autocast gave NaN
    gradients and the loss was NaN at step 2 (pytorch issue 186799)."""
    cfg = compose_config(
        *tiny_fast_run(tiny_data_dir), "model.compile=true", "trainer.precision=bf16-mixed"
    )
    metrics = train(cfg)  # FiniteLoss stops the run if a loss turns NaN
    assert metrics["status"] == "completed" and 0 <= metrics["test/acc"] <= 1

    model = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").model
    assert model.hparams.compile is False and model.net._compiled_call_impl is None
    assert not any("_orig_mod" in key for key in model.state_dict())
