"""Import TensorFlow quietly, the same way in notebooks, tests and scripts.

TensorFlow 2.21 writes a few lines to the process's standard error while it
loads (oneDNN and CUDA notices, with timestamps), before its own logging is
set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not silence them.  In a Jupyter
kernel they become a stderr output of the importing cell, which changes on
every run.  :func:`import_tensorflow` sends file descriptor 2 to the null
device for the duration of the import only, and lowers TensorFlow's Python
logger to errors.  Errors raised by the import still propagate.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

__all__ = ["import_tensorflow"]


@contextlib.contextmanager
def _stderr_fd_silenced() -> Iterator[None]:
    """Point OS-level file descriptor 2 at the null device, then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def import_tensorflow(legacy_keras: bool = False) -> ModuleType:
    """Import and return ``tensorflow`` without its start-up chatter.

    Parameters
    ----------
    legacy_keras : bool
        Make ``tf.compat.v1.layers`` (the source text's TF1 API) available by
        setting ``TF_USE_LEGACY_KERAS=1`` before the first import; this needs
        the ``tf-keras`` package (chapter 6).  It must be decided before
        TensorFlow is first imported in the process.

    Raises
    ------
    ImportError
        TensorFlow is not installed: ``pip install
        "batchnorm-companion[tf]"`` (TensorFlow and tf-keras).
    RuntimeError
        ``legacy_keras=True`` after TensorFlow was already imported without
        it.
    """
    if legacy_keras:
        if (
            "tensorflow" in sys.modules
            and os.environ.get("TF_USE_LEGACY_KERAS") != "1"
        ):
            raise RuntimeError(
                "legacy_keras=True must be requested before TensorFlow is "
                "first imported in this process; restart the kernel and call "
                "import_tensorflow(legacy_keras=True) first"
            )
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    install = 'pip install "batchnorm-companion[tf]"'
    if legacy_keras and importlib.util.find_spec("tf_keras") is None:
        raise ImportError(
            "legacy_keras=True needs the tf-keras package (TensorFlow's "
            f"legacy Keras, for tf.compat.v1.layers): {install}"
        )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _stderr_fd_silenced():
            import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            f"TensorFlow could not be imported ({error}); companion.tf_env "
            f"and companion.tf_models need it: {install}"
        ) from error
    tf.get_logger().setLevel(logging.ERROR)
    module: ModuleType = tf
    return module
