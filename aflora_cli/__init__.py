"""aflora: Adaptive Freezing of Low-Rank Adaptation (Liu, Kundu et al., 2024), as a command-line tool and a library.

From Python (see docs/python-api.md):

    from aflora_cli import AfloraCallback, AfloraConfig, add_adapters

    config = AfloraConfig(freezing={"t_i": "20%", "t_f": "40%"})
    add_adapters(model, config)                      # any transformers model
    trainer = Trainer(model=model, ..., callbacks=[AfloraCallback(config, data={"task": "movie_reviews"})])

The names below load on first use, so that `aflora --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AfloraConfig": "aflora_cli.library.adapters",
    "Adapters": "aflora_cli.library.adapters",
    "add_adapters": "aflora_cli.library.adapters",
    "merge_adapters": "aflora_cli.library.adapters",
    "save_adapters": "aflora_cli.library.adapters",
    "load_checkpoint": "aflora_cli.library.adapters",
    "AfloraCallback": "aflora_cli.library.callback",
    "AdapterConfig": "aflora_cli.engine.config",
    "FreezingConfig": "aflora_cli.engine.config",
    "DataConfig": "aflora_cli.recipe",
    "Freezer": "aflora_cli.engine.freezing",
    "release_from_optimizer": "aflora_cli.engine.freezing",
    "model_dir": "aflora_cli.engine.base_model",
    "AfloraError": "aflora_cli.errors",
}
__all__ = [
    "AdapterConfig",
    "Adapters",
    "AfloraCallback",
    "AfloraConfig",
    "AfloraError",
    "DataConfig",
    "Freezer",
    "FreezingConfig",
    "add_adapters",
    "load_checkpoint",
    "merge_adapters",
    "model_dir",
    "release_from_optimizer",
    "save_adapters",
]

if TYPE_CHECKING:
    from aflora_cli.engine.base_model import model_dir
    from aflora_cli.engine.config import AdapterConfig, FreezingConfig
    from aflora_cli.engine.freezing import Freezer, release_from_optimizer
    from aflora_cli.errors import AfloraError
    from aflora_cli.library.adapters import (
        Adapters,
        AfloraConfig,
        add_adapters,
        load_checkpoint,
        merge_adapters,
        save_adapters,
    )
    from aflora_cli.library.callback import AfloraCallback
    from aflora_cli.recipe import DataConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aflora_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
