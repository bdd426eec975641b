"""The ``.npz`` state file of a :class:`~companion.layers.BatchNorm`.

One file holds, as plain arrays (read with ``allow_pickle=False``):

* ``format_version`` -- a 0-d integer, :data:`FORMAT_VERSION`;
* ``config`` -- a 0-d string, JSON: the layer's constructor arguments
  (``axis``, ``momentum``, ``epsilon``, ``center``, ``scale``, and
  ``renorm``, ``renorm_clipping``, ``renorm_momentum``,
  ``virtual_batch_size`` when they are set) and the ``dtype`` of its
  arrays;
* the layer's arrays under their names (``gamma``, ``beta``,
  ``moving_mean``, ``moving_variance``, less those the layer drops; with
  renorm also ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``).

:func:`read` checks everything before it returns, so that a layer that
loads a file is either fully updated or unchanged.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from companion._validation import (
    check_bool,
    check_epsilon,
    check_finite,
    check_int,
    check_momentum,
    describe,
)
from companion.batch_renorm import check_renorm_clipping

__all__ = ["FORMAT_VERSION", "check_arrays", "read", "read_config", "write"]

FORMAT_VERSION = 1
"""Version of the file layout; :func:`read` refuses any other."""

_META = ("format_version", "config")
_CONFIG_CHECKS = {
    "axis": lambda value: check_int(value, "axis"),
    "momentum": check_momentum,
    "epsilon": check_epsilon,
    "center": lambda value: check_bool(value, "center"),
    "scale": lambda value: check_bool(value, "scale"),
}
_OPTIONAL_CHECKS = {
    "renorm": lambda value: check_bool(value, "renorm"),
    "renorm_clipping": check_renorm_clipping,
    "renorm_momentum": check_momentum,
    "virtual_batch_size": lambda value: check_int(
        value, "virtual_batch_size", low=1
    ),
}
"""Keys a config holds only when the option is set (chapter 16's options,
as ``BatchNorm.get_config`` emits them); files without them are read as
before."""


def _path(path: Any) -> Path:
    """``path`` as a ``Path``; a clear error for anything else."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a str or an os.PathLike; received {describe(path)}"
        )
    return Path(os.fspath(path))


def _with_suffix(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``.npz`` appended unless it ends so (``np.savez``)."""
    text = str(_path(path))
    return Path(text if text.endswith(".npz") else text + ".npz")


def _resolve(path: str | os.PathLike[str]) -> Path:
    """The existing file: ``path`` itself, else ``path`` + ``.npz``."""
    given = _path(path)
    if given.exists():
        return given
    suffixed = _with_suffix(given)
    if suffixed.exists():
        return suffixed
    tried = [str(given)] + ([str(suffixed)] if suffixed != given else [])
    raise FileNotFoundError(
        f"no BatchNorm state file at {' or '.join(map(repr, tried))}"
    )


def check_arrays(
    arrays: dict[str, np.ndarray],
    channels: int | None,
    label: str,
    dtype: np.dtype | None = None,
) -> None:
    """Check a layer's arrays by name before any is assigned.

    Every array must have shape (C,), with C the layer's ``channels`` (or
    that of ``moving_mean`` for an unbuilt layer, at least 1), be finite,
    and have ``dtype`` when one is given; ``moving_variance`` must be >= 0
    (0 is a valid variance -- a constant channel with ``momentum=0`` --
    and epsilon keeps the layer finite there).
    """
    if channels is not None:
        expected, origin = (channels,), " (the layer's channels)"
    else:
        expected, origin = arrays["moving_mean"].shape, " (moving_mean's)"
        if len(expected) != 1 or expected[0] < 1:
            raise ValueError(
                f"{label}['moving_mean'] must have shape (C,) with C >= 1; "
                f"received shape {expected}"
            )
    for name, array in arrays.items():
        item = f"{label}[{name!r}]"
        if dtype is not None and array.dtype != dtype:
            raise ValueError(
                f"{item} has dtype {array.dtype}; expected {dtype} (the "
                "dtype in the file's config)"
            )
        if array.shape != expected:
            raise ValueError(
                f"{item} has shape {array.shape}; expected {expected}{origin}"
            )
        check_finite(array, item)
    variance = arrays["moving_variance"]
    if np.any(variance < 0):
        raise ValueError(
            f"{label}['moving_variance'] must be >= 0 in every channel (a "
            f"variance); received {float(variance.min())!r} at index "
            f"{int(np.argmin(variance))}"
        )


def write(
    path: str | os.PathLike[str],
    arrays: dict[str, np.ndarray],
    config: dict[str, Any],
    dtype: np.dtype,
) -> Path:
    """Write a state file; returns its path (``.npz`` appended if needed).

    The file is written next to its destination and then moved there, so
    an interrupted save never leaves half a file under that name.
    """
    target = _with_suffix(path)
    document = json.dumps({**config, "dtype": np.dtype(dtype).name})
    payload: dict[str, Any] = {
        "format_version": np.array(FORMAT_VERSION),
        "config": np.array(document),
        **arrays,
    }
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") as file:
            np.savez(file, **payload)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _load(source: Path, label: str) -> dict[str, np.ndarray]:
    """Every array of the file, read without pickle."""
    unreadable = (
        OSError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
    )
    try:
        # Our own file object: np.load leaks the one it opens when the zip
        # archive turns out to be corrupt.
        with open(source, "rb") as file:
            data = np.load(file, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError(
                    "it holds a single array (a .npy file), not named arrays"
                )
            with data:
                return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except unreadable as error:
        raise ValueError(
            f"{label} is not a readable .npz file written by BatchNorm.save "
            f"({type(error).__name__}: {error})"
        ) from error


def _check_version(state: dict[str, np.ndarray], label: str) -> None:
    if "format_version" not in state:
        raise ValueError(
            f"{label} has no 'format_version' array, so it was not written "
            "by BatchNorm.save; expected the keys 'format_version', "
            f"'config' and the layer's arrays; received {sorted(state)}"
        )
    version = state["format_version"]
    if version.shape != () or version.dtype.kind not in "iu":
        raise ValueError(
            f"{label}['format_version'] must be a single integer; received "
            f"an array of dtype {version.dtype} and shape {version.shape}"
        )
    if int(version) != FORMAT_VERSION:
        raise ValueError(
            f"{label} has format version {int(version)}; this version of "
            f"companion reads format version {FORMAT_VERSION}"
        )


def _parse_config(
    state: dict[str, np.ndarray], label: str
) -> tuple[dict[str, Any], np.dtype]:
    """The constructor arguments and the arrays' dtype from ``config``."""
    if "config" not in state:
        raise ValueError(
            f"{label} has no 'config' array (the layer's settings); "
            f"received keys {sorted(state)}"
        )
    raw = state["config"]
    try:
        if raw.shape != () or raw.dtype.kind != "U":
            raise ValueError(
                f"expected a single string; received an array of dtype "
                f"{raw.dtype} and shape {raw.shape}"
            )
        document = json.loads(str(raw[()]))
        if not isinstance(document, dict):
            raise ValueError(f"expected a JSON object; received {document!r}")
        expected = [*_CONFIG_CHECKS, "dtype"]
        missing = sorted(set(expected) - set(document))
        unknown = sorted(set(document) - set(expected) - set(_OPTIONAL_CHECKS))
        if missing or unknown:
            raise ValueError(
                f"expected the keys {expected} (and optionally "
                f"{list(_OPTIONAL_CHECKS)}); received {sorted(document)}"
            )
        checks = {**_CONFIG_CHECKS, **_OPTIONAL_CHECKS}
        config = {
            key: check(document[key])
            for key, check in checks.items()
            if key in document
        }
        dtype = np.dtype(document["dtype"])
        if dtype.kind != "f" or dtype.itemsize < 4:
            raise ValueError(
                f"dtype must be float32 or float64; received {dtype.name}"
            )
    except (TypeError, ValueError) as error:  # JSONDecodeError included
        raise ValueError(f"{label} has an invalid config: {error}") from None
    return config, dtype


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The constructor arguments stored in a state file."""
    source = _resolve(path)
    label = f"state file {str(source)!r}"
    state = _load(source, label)
    _check_version(state, label)
    return _parse_config(state, label)[0]


def read(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    names: list[str],
    *,
    channels: int | None,
    dtype: np.dtype | None,
) -> tuple[dict[str, np.ndarray], np.dtype]:
    """The arrays of a state file, checked against a layer.

    ``config``, ``names``, ``channels`` and ``dtype`` describe the layer
    (``channels`` and ``dtype`` are None for an unbuilt layer).  Returns
    the arrays by name and their dtype.  Raises ``ValueError`` naming the
    first thing that differs.
    """
    source = _resolve(path)
    label = f"state file {str(source)!r}"
    state = _load(source, label)
    _check_version(state, label)
    file_config, file_dtype = _parse_config(state, label)
    keys = [*config, *(key for key in file_config if key not in config)]
    differ = [key for key in keys if file_config.get(key) != config.get(key)]
    if differ:
        saved = ", ".join(f"{key}={file_config.get(key)!r}" for key in differ)
        mine = ", ".join(f"{key}={config.get(key)!r}" for key in differ)
        raise ValueError(
            f"{label} was saved by a BatchNorm with {saved}; this layer has "
            f"{mine}; use BatchNorm.from_file(path) for a layer with the "
            "file's settings"
        )
    if dtype is not None and file_dtype != dtype:
        raise ValueError(
            f"{label} holds {file_dtype.name} arrays; this layer's arrays "
            f"are {np.dtype(dtype).name} (values would be rounded); load it "
            "into an unbuilt layer (BatchNorm.from_file(path))"
        )
    present = set(state) - set(_META)
    missing = [name for name in names if name not in present]
    extra = sorted(present - set(names))
    if missing or extra:
        problems = [f"lacks {missing}"] if missing else []
        problems += [f"has unexpected arrays {extra}"] if extra else []
        raise ValueError(
            f"{label} {' and '.join(problems)}; expected exactly {names} "
            "besides 'format_version' and 'config'"
        )
    arrays = {name: state[name] for name in names}
    check_arrays(arrays, channels, label, dtype=file_dtype)
    return arrays, file_dtype
