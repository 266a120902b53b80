"""cifar_cnn: a Lightning + Hydra baseline for CIFAR-10 image classification."""

from cifar_cnn import config  # noqa: F401  (registers the OmegaConf resolvers that conf/ uses)
from cifar_cnn.console import silence_known_noise

silence_known_noise()
