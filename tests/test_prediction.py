import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cnn.data import CLASSES
from cifar_cnn.errors import UserError
from cifar_cnn.nets import TutorialCNN
from cifar_cnn.prediction import checkpoint_classifier, load_image_file, predict_files


def classifier() -> Callable[[torch.Tensor], torch.Tensor]:
    return checkpoint_classifier(TutorialCNN(), torch.device("cpu"))


def pixels(path: Path) -> np.ndarray:
    return load_image_file(path).permute(1, 2, 0).numpy()


def test_transparent_images_are_put_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent
    image.save(tmp_path / "half.png")
    result = pixels(tmp_path / "half.png")
    assert (result[:, :14] == 255).all() and (result[:, 18:] == (255, 0, 0)).all()


def test_photos_are_turned_upright_by_their_exif_tag(tmp_path: Path) -> None:
    """A camera stores a portrait photo on its side, with orientation 6: turn it 90° right."""
    stored = Image.new("RGB", (64, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 64, 32))  # red at the top as stored: the right once upright
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    upright = pixels(tmp_path / "photo.jpg").astype(int)
    assert np.abs(upright[:, 20:] - (255, 0, 0)).max() <= 12  # red on the right
    assert np.abs(upright[:, :12] - (0, 0, 255)).max() <= 12  # blue on the left


def test_grayscale_and_palette_images_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (32, 32), 90).save(tmp_path / "gray.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).convert("P").save(tmp_path / "palette.gif")
    assert (pixels(tmp_path / "gray.png") == 90).all()
    assert (pixels(tmp_path / "palette.gif") == (0, 0, 255)).all()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_images_deeper_than_8_bits_are_refused_not_clipped(mode: str, tmp_path: Path) -> None:
    Image.new(mode, (32, 32), 9000).save(tmp_path / "deep.tiff")  # convert("RGB") gave 255s
    with pytest.raises(ValueError, match=f"{mode} pixels"):
        load_image_file(tmp_path / "deep.tiff")


def test_other_sizes_are_centre_cropped_not_stretched(tmp_path: Path) -> None:
    image = Image.new("RGB", (300, 100), "red")
    image.paste((0, 255, 0), (100, 0, 200, 100))  # the centre square is green
    image.save(tmp_path / "wide.png")
    result = load_image_file(tmp_path / "wide.png")
    assert result.shape == (3, 32, 32) and result.dtype == torch.uint8
    centre = pixels(tmp_path / "wide.png")[:, 2:-2].astype(int)  # Lanczos rings a little
    assert np.abs(centre - (0, 255, 0)).max() <= 8


def test_folder_predictions_skip_what_is_not_an_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(folder / "b_gray.png")
    rgba = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(folder / "c_rgba.png")
    (folder / "notes.txt").write_text("not an image")
    csv_path = tmp_path / "predictions.csv"

    with caplog.at_level(logging.INFO):
        rows = predict_files(classifier(), folder, csv_path)
    skips = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skips) == 1 and f"skipped {folder / 'notes.txt'}" in skips[0]

    with csv_path.open() as file:
        table = list(csv.DictReader(file))
    assert [Path(row["file"]).name for row in table] == ["a.jpg", "b_gray.png", "c_rgba.png"]
    assert len(rows) == 3
    for row in table:
        assert {row["class"], row["second"], row["third"]} <= set(CLASSES)
        probabilities = [float(row[k]) for k in ("probability", "second_probability")]
        probabilities.append(float(row["third_probability"]))
        assert 1 >= probabilities[0] >= probabilities[1] >= probabilities[2] >= 0


def test_empty_or_missing_sources_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is an empty folder"):
        predict_files(classifier(), tmp_path / "empty", tmp_path / "p.csv")
    with pytest.raises(UserError, match="does not exist"):
        predict_files(classifier(), tmp_path / "gone", tmp_path / "p.csv")
