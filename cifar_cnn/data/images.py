"""CIFAR-10's images: the classes, and the conversions that training and prediction share."""

from PIL import Image, ImageOps
from torch import Tensor

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)


def to_float_images(images: Tensor) -> Tensor:
    """uint8 images (N, 3, H, W) to float32 in [0, 1], the scale the tutorial trained on."""
    return images.float().div_(255)


def deeper_than_8_bits(image: Image.Image) -> bool:
    """16- and 32-bit images (integer or float), which convert("RGB") clips instead of scaling."""
    return image.mode in ("I", "F") or image.mode.startswith("I;")


def upright_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit image as RGB, as training and `predict=` both read files: turned upright by its
    EXIF tag, transparent parts put on white (convert("RGB") alone keeps the colours hidden
    under them)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")
