"""ImageClassifier: optimizer and schedule from configs, metrics, test-time augmentation."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cifar_cnn.data import CIFAR10DataModule
from cifar_cnn.module import ImageClassifier

NET = {"_target_": "cifar_cnn.nets.TutorialCNN", "hidden_units": 32}


ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 3e-4}


def fit_briefly(
    model: ImageClassifier, data_dir: Path, tmp_path: Path, **settings: Any
) -> L.Trainer:
    """Fits on the tiny data (80 training images, batches of 16) with the trainer `settings`
    (its steps or epochs, say)."""
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **settings,
    )  # fmt: skip
    trainer.fit(model, CIFAR10DataModule(data_dir, tmp_path / "cache", batch_size=16))
    return trainer


@pytest.fixture
def trained(tiny_data_dir: Path, tmp_path: Path) -> tuple[L.Trainer, ImageClassifier, dict]:
    """A model after 3 steps, and its weights before them."""
    model = ImageClassifier(net=NET, optimizer=ADAM)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    return fit_briefly(model, tiny_data_dir, tmp_path, max_steps=3), model, initial


def test_optimizer_comes_from_the_partial_config() -> None:
    optimizer = ImageClassifier(net=NET, optimizer=ADAM).configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 3e-4


def test_training_changes_every_weight(
    trained: tuple[L.Trainer, ImageClassifier, dict],
) -> None:
    trainer, model, initial = trained
    assert trainer.global_step == 3
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, initial[name]), f"{name} did not change"


def test_checkpoint_reloads_without_hydra_and_predicts_the_same(
    trained: tuple[L.Trainer, ImageClassifier, dict], tmp_path: Path
) -> None:
    trainer, model, _ = trained
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path, weights_only=False)  # the full checkpoint, as training saves

    checkpoint = torch.load(path, weights_only=True)  # plain values only: no pickled objects
    expected = {
        "net": NET, "optimizer": ADAM, "scheduler": None, "num_classes": 10,
        "label_smoothing": 0.0, "flip_tta": False, "channels_last": False,
        "norm_bias_lr_scale": 1.0, "translate_tta": False, "compile": False,
    }  # fmt: skip
    assert checkpoint["hyper_parameters"] == expected

    reloaded = ImageClassifier.load_from_checkpoint(
        path, map_location="cpu", weights_only=True
    ).eval()
    images = torch.rand(8, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(reloaded(images), model.eval()(images))


ONE_CYCLE = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True, "max_lr": 0.01}


def test_a_schedule_steps_every_batch_over_the_whole_run(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    model = ImageClassifier(net=NET, optimizer=ADAM, scheduler=ONE_CYCLE)
    trainer = fit_briefly(model, tiny_data_dir, tmp_path, max_epochs=2)
    [config] = trainer.lr_scheduler_configs
    assert config.interval == "step"
    assert config.scheduler.total_steps == trainer.global_step == 10  # 80 images / 16, 2 epochs
    assert config.scheduler.get_last_lr()[0] < 0.01 / 10  # annealed far below max_lr by the end


def test_a_scheduler_must_be_a_scheduler_class() -> None:
    with pytest.raises(ValueError, match="_target_ os.system is not a LRScheduler class"):
        ImageClassifier(net=NET, optimizer=ADAM, scheduler={"_target_": "os.system"})


def test_schedulers_without_a_length_work_too(tiny_data_dir: Path, tmp_path: Path) -> None:
    step_lr = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2}
    model = ImageClassifier(net=NET, optimizer=ADAM, scheduler=step_lr)
    trainer = fit_briefly(model, tiny_data_dir, tmp_path, max_steps=4)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(3e-6)


def test_epoch_metrics_are_the_mean_batch_loss_and_the_share_of_correct_images(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """Each batch's loss and correct predictions, recorded as it trains (no dropout: the
    net computes the same before its step as inside it), make the epoch's metrics: the
    second epoch's, of its own batches only."""

    class Batches(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, int, int, float]] = []  # epoch, correct, images, loss

        def on_train_batch_start(
            self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            images, labels = batch
            with torch.no_grad():
                self._correct = int((pl_module.net(images).argmax(1) == labels).sum())

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
            batch_idx: int,
        ) -> None:  # fmt: skip
            epoch, images = trainer.current_epoch, len(batch[1])
            self.seen.append((epoch, self._correct, images, outputs["loss"].item()))

    model = ImageClassifier(net={**NET, "dropout": 0.0}, optimizer=ADAM)
    batches = Batches()
    trainer = fit_briefly(
        model, tiny_data_dir, tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[batches]
    )

    second = [(correct, images, loss) for epoch, correct, images, loss in batches.seen if epoch]
    assert len(batches.seen) == 10 and len(second) == 5
    correct, images = sum(row[0] for row in second), sum(row[1] for row in second)
    metrics = trainer.callback_metrics
    mean_loss = sum(row[2] for row in second) / 5
    assert metrics["train/loss_epoch"] == pytest.approx(mean_loss, rel=1e-6)
    assert metrics["train/acc_epoch"] == pytest.approx(correct / images)
    assert images == 80 and 0 < correct < images  # a value that a wrong count would change


def test_the_sanity_check_before_training_is_no_result(tiny_data_dir: Path, tmp_path: Path) -> None:
    class BestSoFar(L.Callback):
        def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.updates = pl_module.val_acc_best.update_count

    best_so_far = BestSoFar()
    model = ImageClassifier(net=NET, optimizer=ADAM)
    fit_briefly(model, tiny_data_dir, tmp_path, max_steps=1, callbacks=[best_so_far])
    assert best_so_far.updates == 0  # Lightning's two batches of sanity check ran before


class ValLossReader(L.Callback):
    """Records val/loss where callbacks read it: at the validation epoch's end (which Lightning
    calls on callbacks before the module) and at the validation's end."""

    def __init__(self) -> None:
        self.at_epoch_end: list[float] = []
        self.at_end: list[float] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.at_epoch_end.append(float(trainer.callback_metrics.get("val/loss", "nan")))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.at_end.append(float(trainer.callback_metrics["val/loss"]))


def test_callbacks_read_each_epochs_own_val_loss(tiny_data_dir: Path, tmp_path: Path) -> None:
    reader = ValLossReader()
    model = ImageClassifier(net=NET, optimizer=ADAM)
    fit_briefly(model, tiny_data_dir, tmp_path, max_epochs=2, callbacks=[reader])
    assert len(reader.at_end) == 2 and reader.at_end[0] != reader.at_end[1]
    assert reader.at_epoch_end == reader.at_end


def test_epoch_metrics_count_each_batch_once_when_a_window_ends_the_run(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    """max_steps=3 with accumulate_grad_batches=2 ends after 6 of the epoch's 10 batches; the
    window's two batches share step 2, and only its last one logs the epoch's metrics."""
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                               outputs: Any, *args: Any) -> None:  # fmt: skip
            losses.append(outputs["loss"].item())

    model = ImageClassifier(net={**NET, "dropout": 0.0}, optimizer=ADAM)
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, max_steps=3,
        accumulate_grad_batches=2, limit_val_batches=0, callbacks=[Losses()],
    )  # fmt: skip
    trainer.fit(model, CIFAR10DataModule(tiny_data_dir, tmp_path / "cache", batch_size=8))
    assert len(losses) == 6
    mean = sum(losses) * 2 / 6  # Lightning's outputs: each loss / accumulate_grad_batches
    assert trainer.callback_metrics["train/loss_epoch"] == pytest.approx(mean, rel=1e-6)


FAST_NET = {"_target_": "cifar_cnn.fast_recipe.FastCNN", "widths": [8, 16, 16]}


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


def test_norm_biases_get_a_scaled_rate_and_the_same_decay_per_step() -> None:
    model = ImageClassifier(FAST_NET, SGD, norm_bias_lr_scale=64)
    others, biases = model.configure_optimizers().param_groups
    assert (others["lr"], others["weight_decay"]) == (0.1, 1e-3)
    assert biases["lr"] == pytest.approx(6.4) and biases["weight_decay"] == pytest.approx(1e-3 / 64)
    assert len(biases["params"]) == 6  # two BatchNorms in each of three stages
    assert len(others["params"]) + len(biases["params"]) == len(list(model.parameters()))


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


def test_one_hot_targets_give_the_plain_loss_and_mixed_ones_count_their_dominant_class() -> None:
    """Soft labels (MixUp, CutMix) train with the cross-entropy against the probabilities;
    one-hot ones give what the class indices give; train/acc counts a mixed image as right
    when the net's class is the one that makes up most of it."""
    model = ImageClassifier(NET, ADAM)
    logged = {}
    model.log_dict = lambda metrics, **kwargs: logged.update(metrics)
    model.trainer = SimpleNamespace(
        log_every_n_steps=0, num_training_batches=1, global_step=0, max_steps=-1,
        accumulate_grad_batches=1,
    )  # fmt: skip
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model.eval()  # no dropout: the same logits at each step
    logits = model.net(images)
    model.on_train_epoch_start()
    plain = model.training_step((images, labels), 0)
    model.on_train_epoch_start()
    one_hot = model.training_step((images, F.one_hot(labels, 10).float()), 0)
    assert torch.allclose(plain, one_hot) and torch.allclose(plain, F.cross_entropy(logits, labels))

    mixed = 0.7 * F.one_hot(labels, 10) + 0.3 * F.one_hot(labels.roll(1), 10)
    model.on_train_epoch_start()
    loss = model.training_step((images, mixed), 0)
    assert torch.allclose(loss, -(mixed * logits.log_softmax(dim=1)).sum(dim=1).mean())
    expected = (logits.argmax(dim=1) == labels).float().mean()
    assert torch.allclose(logged["train/acc_epoch"], expected)
