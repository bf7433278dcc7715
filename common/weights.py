"""Model weights from someone else: their dtypes, their values, and ``.npz`` files read with every
size checked before anything is inflated.

A weights file or a coordinator's arrays may be hostile. What is refused here, each with one
line that names the array (never a value):

* a dtype that is not a real float (:func:`is_real_float`): int, bool, complex and object arrays
  are refused rather than cast (complex values pass ``np.isfinite``, and a cast would silently
  drop the imaginary part or turn integers into weights);
* a value that is NaN, infinite or larger in magnitude than :data:`MAX_ABS_WEIGHT`
  (:func:`values_problem`): such a model predicts NaN or saturates on every input;
* in an ``.npz`` (:func:`read_npz`): a member that is not a ``.npy`` array, a pickled object
  array, a duplicate name, or a declared shape whose size exceeds the expected shape or the cap.
  Each member's ``.npy`` header (shape, dtype) is read first and checked, and then exactly the
  bytes it declares are read into an array of that size, so a small archive whose member
  inflates to gigabytes costs nothing.

Pure NumPy (no torch): the coordinator (:mod:`dicomfl.server.checks`) and the site share it.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import printable

#: The dtypes a model's floating-point arrays may have. Complex and extended precision are not
#: accepted: complex values pass ``np.isfinite`` and then break the aggregation.
REAL_FLOAT_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})

#: The largest magnitude a weight may have. A trained network of this package has weights of
#: order 1; a value past this (3e38, say) is a broken or hostile model, not a trained one.
MAX_ABS_WEIGHT = 1.0e6

#: The most bytes an ``.npz`` read without an expected shape may hold (all members together).
MAX_NPZ_BYTES = 1 << 30
#: The most members an ``.npz`` may have.
MAX_NPZ_MEMBERS = 10_000
_MAX_HEADER = 10_000  # bytes of one .npy header (NumPy's own default limit)


class WeightsError(ValueError):
    """Weights that cannot be used: the message is one line naming the array, never a value."""


def is_real_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is float16, float32 or float64 (either byte order).

    Parameters
    ----------
    dtype : numpy.dtype
        The dtype to test.

    Returns
    -------
    bool
        True for the three IEEE real floating types, False for complex, integer, bool, object,
        structured and extended-precision dtypes.
    """
    try:
        return np.dtype(dtype).newbyteorder("=") in REAL_FLOAT_DTYPES
    except (TypeError, ValueError):
        return False


def dtype_problem(dtype: np.dtype, ref_dtype: np.dtype) -> str | None:
    """Why an array of ``dtype`` cannot stand in for one of ``ref_dtype`` (None if it can).

    A floating reference takes any real float (float16/32/64). A non-floating reference (an
    integer buffer, say) takes exactly its own dtype.

    Parameters
    ----------
    dtype : numpy.dtype
        The dtype the site sent.
    ref_dtype : numpy.dtype
        The global model's dtype for the same parameter.

    Returns
    -------
    str or None
        A short reason, or None when the dtype is acceptable.
    """
    if is_real_float(ref_dtype):
        return None if is_real_float(dtype) else f"dtype {np.dtype(dtype).name} (not a real float)"
    if np.dtype(dtype) == np.dtype(ref_dtype):
        return None
    return f"dtype {np.dtype(dtype).name}, expected {np.dtype(ref_dtype).name}"


def _name(key: object) -> str:
    return printable(str(key))[:80]


def values_problem(arrays: Mapping[str, np.ndarray], max_abs: float = MAX_ABS_WEIGHT) -> str | None:
    """Why these weights cannot be used as a model's (None if they can): an array whose dtype is
    not a real float, or that holds a NaN, an infinity or a magnitude above ``max_abs``."""
    for k, v in arrays.items():
        a = np.asarray(v)
        if not is_real_float(a.dtype):
            return f"{_name(k)} has dtype {a.dtype.name} (not a real float)"
        if a.size == 0:
            continue
        if not np.isfinite(a).all():
            return f"{_name(k)} holds NaN or infinite values"
        if float(np.max(np.abs(a))) > max_abs:
            return f"{_name(k)} holds values above {max_abs:g} in magnitude"
    return None


def _header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh, max_header_size=_MAX_HEADER)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh, max_header_size=_MAX_HEADER)
    raise WeightsError(f"unsupported .npy format version {version[0]}.{version[1]}")


def npz_headers(path: Path, *, max_bytes: int = MAX_NPZ_BYTES, max_members: int = MAX_NPZ_MEMBERS
                ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each member's (shape, dtype) as its ``.npy`` header declares it, nothing inflated past
    the headers. Raises :class:`WeightsError` (or ``zipfile.BadZipFile`` / ``OSError`` for a
    file that is not a zip archive) for what :func:`read_npz` refuses."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise WeightsError(f"{len(infos)} members (at most {max_members})")
        for info in infos:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise WeightsError(f"member {_name(info.filename)} is not a .npy array")
            key = info.filename[:-4]
            if key in out:
                raise WeightsError(f"member {_name(key)} appears twice")
            with zf.open(info) as fh:
                try:
                    shape, _fortran, dtype = _header(fh)
                except WeightsError:
                    raise
                except (ValueError, EOFError, SyntaxError, TypeError) as exc:
                    raise WeightsError(f"member {_name(key)}: not a .npy array ({type(exc).__name__})") from None
            if dtype.hasobject:
                raise WeightsError(f"member {_name(key)} holds pickled objects (refused)")
            nbytes = math.prod(shape) * dtype.itemsize
            total += nbytes
            if total > max_bytes:
                raise WeightsError(f"member {_name(key)} declares {nbytes:,} bytes; the file would hold more than "
                                   f"{max_bytes:,}")
            out[key] = (tuple(int(n) for n in shape), dtype)
    return out


def shapes_problem(headers: Mapping[str, tuple], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why arrays of these (shape, ...) cannot be the model whose state-dict shapes are
    ``expected`` (None if they can): a missing or unexpected name, or a different shape."""
    missing = sorted(set(expected) - set(headers))
    extra = sorted(set(headers) - set(expected))
    if missing or extra:
        return (f"weights do not match the model: missing {[_name(k) for k in missing[:3]]}, "
                f"unexpected {[_name(k) for k in extra[:3]]}")
    for k, shape in expected.items():
        if tuple(headers[k][0]) != tuple(shape):
            return f"weights do not match the model: {_name(k)} has shape {tuple(headers[k][0])}, expected {tuple(shape)}"
    return None


def read_npz(path: Path, expected: Mapping[str, tuple[int, ...]] | None = None, *, floats_only: bool = True,
             max_bytes: int = MAX_NPZ_BYTES, max_members: int = MAX_NPZ_MEMBERS) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (``np.savez``), every bound checked from the headers first.

    Parameters
    ----------
    path : Path
        The archive.
    expected : mapping of name to shape, optional
        The model's state-dict shapes (:func:`dicomfl.common.model.state_shapes`): every name
        must be present with exactly its shape, checked before any array is read.
    floats_only : bool
        Refuse an array whose dtype is not a real float (model weights); off for other archives.
    max_bytes, max_members : int
        Caps on the declared size of all members together and on their number.

    Raises
    ------
    WeightsError
        One line naming the member: not a ``.npy``, pickled objects, a duplicate, a dtype that is
        not a real float, a size past the cap, a shape other than expected, or fewer bytes than
        the header declares.
    zipfile.BadZipFile, OSError
        Not a zip archive, or unreadable.
    """
    headers = npz_headers(path, max_bytes=max_bytes, max_members=max_members)
    if floats_only:
        for k, (_, dtype) in headers.items():
            if not is_real_float(dtype):
                raise WeightsError(f"{_name(k)} has dtype {dtype.name} (not a real float)")
    if expected is not None and (why := shapes_problem(headers, expected)):
        raise WeightsError(why)
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        for key in headers:
            with zf.open(key + ".npy") as fh:
                shape, fortran, dtype = _header(fh)
                if (tuple(shape), dtype) != headers[key]:  # the archive changed under us
                    raise WeightsError(f"member {_name(key)} changed while it was read")
                arr = np.empty(math.prod(shape), dtype=dtype)
                view = memoryview(arr).cast("B")
                got = 0
                while got < len(view):
                    n = fh.readinto(view[got:])
                    if not n:
                        raise WeightsError(f"member {_name(key)} is shorter than its header declares")
                    got += n
                if fh.read(1):
                    raise WeightsError(f"member {_name(key)} is longer than its header declares")
            out[key] = arr.reshape(shape, order="F" if fortran else "C")
    return out


__all__ = ["MAX_ABS_WEIGHT", "MAX_NPZ_BYTES", "REAL_FLOAT_DTYPES", "WeightsError", "dtype_problem", "is_real_float",
           "npz_headers", "read_npz", "shapes_problem", "values_problem"]
