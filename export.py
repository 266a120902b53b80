"""Export a checkpoint as a deployable model, checked against PyTorch; settings in
conf/export.yaml.

python export.py ckpt_path=outputs/runs/<run>                     # its best checkpoint, ONNX
python export.py ckpt_path=path/to/model.ckpt format=torchscript  # any checkpoint, TorchScript
python export.py ckpt_path=outputs/runs/<run> tta=false           # without test-time augmentation
"""

import hydra
from omegaconf import DictConfig

from cifar_cnn.errors import exit_on_user_error
from cifar_cnn.export import export
from cifar_cnn.resolvers import register_resolvers
from cifar_cnn.runtime import silence_known_warnings


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    silence_known_warnings()  # again: a launcher's job process does not run this file's end
    with exit_on_user_error():
        export(cfg)


if __name__ == "__main__":
    register_resolvers()
    silence_known_warnings()
    main()
