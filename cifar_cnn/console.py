"""Known harmless library messages, silenced in this one place so that real warnings stand out."""

import logging
import os
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_noise() -> None:
    # Lightning 2.6 builds torch's LeafSpec, which torch 2.14 deprecates; nothing for us to change.
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning
    )
    # Our batches are slices of in-memory tensors: loader worker processes would only add cost.
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    # optuna 2.10 (the Hydra sweeper's) uses SQLAlchemy 1.4 APIs, pinned below 2 in pyproject.toml;
    # SQLAlchemy's own switch for its "not compatible with 2.0" notice, read when it is imported.
    os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
    # An advertisement for a hosted service, printed at every Trainer start.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip"))
    # Two ModelCheckpoints (the best; last.ckpt): "best" is the first's, as train.py intends.
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="best"\)` is called with Trainer')
    # The model summary's size under bf16-mixed (the default on CPUs with bf16 instructions):
    # its "Using 32 bits instead" is right, as mixed precision keeps the weights in float32.
    warnings.filterwarnings("ignore", message=r"Precision .*-mixed is not supported by the model")
