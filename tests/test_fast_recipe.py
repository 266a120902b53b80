"""The fast recipe: FastCNN, its whitened stem, lookahead, its schedule, whole runs."""

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cifar_cnn.checkpoints import load_checkpoint
from cifar_cnn.errors import StoppedBySignal, UserError
from cifar_cnn.fast_recipe import FastCNN, Lookahead, TriangularLR, WhitenStem
from cifar_cnn.module import ImageClassifier
from cifar_cnn.nets import TutorialCNN
from cifar_cnn.training import build, train

from .conftest import compose_in


def tiny_fast_run(tiny_data_dir: Path) -> list[str]:
    """experiment=fast for two epochs on the tiny data set, with a narrower net."""
    return [
        "experiment=fast", f"data.data_dir={tiny_data_dir}", "data.batch_size=16",
        "data.eval_batch_size=16", "model.net.widths=[8,16,16]", "trainer.accelerator=cpu",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "logger.tensorboard=null",
    ]  # fmt: skip


def test_fast_cnn_has_airbench_size_and_maps_images_to_logits() -> None:
    net = FastCNN()
    assert sum(p.numel() for p in net.parameters()) == 1_972_792
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == 2 * (64 + 256 + 256)  # the BatchNorm scales
    logits = net(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 10) and logits.dtype == torch.float32
    assert FastCNN(num_classes=5, widths=(8, 16, 32))(torch.rand(2, 3, 32, 32)).shape == (2, 5)


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
    with pytest.raises(UserError, match="callbacks.whiten_stem .* TutorialCNN has none"):
        WhitenStem().setup(trainer, SimpleNamespace(net=TutorialCNN()), "fit")


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
    interrupt = ["+callbacks.interrupt._target_=tests.probes.InterruptAtStep",
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
    gradients and the loss was NaN at step 2 (pytorch/pytorch#186799)."""
    cfg = compose_config(
        *tiny_fast_run(tiny_data_dir), "model.compile=true", "trainer.precision=bf16-mixed"
    )
    metrics = train(cfg)  # FiniteLoss stops the run if a loss turns NaN
    assert metrics["status"] == "completed" and 0 <= metrics["test/acc"] <= 1

    model = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").model
    assert model.hparams.compile is False and model.net._compiled_call_impl is None
    assert not any("_orig_mod" in key for key in model.state_dict())
