"""Rich logging for the CLI, and quiet third-party loggers."""

from __future__ import annotations

import logging
import os
import warnings

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)


def setup_logging(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings only), 0 info, 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=verbosity > 0, rich_tracebacks=False)],
        force=True,
    )
    if verbosity < 1:
        # Library chatter (progress bars, deprecation notes) drowns our own progress otherwise.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in ("diffusers", "transformers", "ray", "accelerate", "torch", "timm", "PIL"):
            logging.getLogger(name).setLevel(logging.WARNING if verbosity >= 0 else logging.ERROR)
