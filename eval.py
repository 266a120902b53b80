"""Evaluate a checkpoint, or classify image files with it; settings in conf/eval.yaml.

python eval.py ckpt_path=outputs/runs/<run>                   # its best checkpoint, test set
python eval.py ckpt_path=path/to/model.ckpt split=val         # any checkpoint, validation set
python eval.py ckpt_path=outputs/runs/<run> predict=photos/   # classify image files
python eval.py ckpt_path=<export>/model.onnx predict=photos/  # with export.py's model
"""

import hydra
from omegaconf import DictConfig

from cifar_cnn.errors import exit_on_user_error
from cifar_cnn.evaluation import evaluate
from cifar_cnn.resolvers import register_resolvers
from cifar_cnn.runtime import silence_known_warnings


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    silence_known_warnings()  # again: a launcher's job process does not run this file's end
    with exit_on_user_error():
        evaluate(cfg)


if __name__ == "__main__":
    register_resolvers()
    silence_known_warnings()
    main()
