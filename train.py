"""Train a CIFAR-10 classifier; every setting comes from conf/ (see `python train.py --help`).

python train.py                                   # the tutorial: 10 epochs, batch 64
python train.py trainer=gpu data.batch_size=128   # override any config value
python train.py debug=fast_dev_run                # one batch of each stage, no checkpoint
python train.py -m model.optimizer.lr=1e-3,3e-4   # a sweep: one run folder per job
python train.py ckpt_path=outputs/runs/<run>     # continue a stopped run, as it was started
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cifar_cnn.errors import exit_on_user_error
from cifar_cnn.jobs import train_in_sweep
from cifar_cnn.resolvers import register_resolvers
from cifar_cnn.resume import continued_config
from cifar_cnn.runtime import silence_known_warnings
from cifar_cnn.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the metric that sweepers optimise (`optimized_metric`); NaN for a failed job."""
    silence_known_warnings()  # again: a launcher's job process does not run this file's end
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return train_in_sweep(cfg, script=__file__)
    with exit_on_user_error():
        metrics = train(continued_config(cfg) if cfg.get("ckpt_path") else cfg)
    return metrics[cfg.optimized_metric]


if __name__ == "__main__":
    register_resolvers()
    silence_known_warnings()
    main()
