"""Train a CIFAR-10 classifier; every setting comes from conf/ (see `python train.py --help`).

python train.py                                   # the seed experiment: 10 epochs, batch 64
python train.py trainer=gpu data.batch_size=128   # override any config value
python train.py debug=fast_dev_run                # one batch of each stage, nothing saved
python train.py -m model.optimizer.lr=1e-3,3e-4   # a sweep: one run folder per job
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from cifar_cnn.errors import UserError
from cifar_cnn.training import train

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the metric that sweepers optimise (`optimized_metric`)."""
    try:
        metrics = train(cfg)
    except UserError as error:
        log.error("%s", error)
        sys.exit(1)
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    main()
