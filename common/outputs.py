"""Where a command may write what it makes: never over the site's own inputs, never through a link.

``dicomfl predict --out`` and ``dicomfl export --out`` write files an operator names. A typo, a
pasted path or a link planted in a shared folder must not turn that into overwriting the labels,
the site key or a certificate, or into writing into the data the site reads. So an output is
refused (:class:`UnsafeOutput`, one line naming the path; the CLI exits 2) when:

* it is, after resolving, a file the site configuration names: every path-valued key of
  ``site.yaml`` (labels, ``secret_file``, the federation's CA certificate and SuperNode key with
  its ``.pub``, the intake's TLS files, any path key added later), and the ``site.yaml`` itself;
* it lies inside ``site.dicom_dir`` or ``site.state_dir``;
* any existing component of its path is a symbolic link (checked with ``lstat``, component by
  component, on the path as given, made absolute), or it is a folder where a file is wanted.

The folder is then opened component by component with ``O_NOFOLLOW`` (:func:`open_folder`,
creating what is missing), and files are written into that descriptor by
:class:`dicomfl.common.files.AtomicFile` (``O_EXCL | O_NOFOLLOW`` temporary, a link at the final
name refused): a link swapped in after the check is refused too, not followed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel

from .config import SiteConfig
from .errors import DicomflError, printable


class UnsafeOutput(DicomflError):
    """An output path that must not be written (see the module doc); the message names it."""


_FOLDER_KEYS = ("site.dicom_dir", "site.state_dir")


def _paths(model: BaseModel, prefix: str) -> Iterator[tuple[str, Path]]:
    """Every path-valued setting of ``model`` (nested sections and lists included), by key."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        many = isinstance(value, (list, tuple))
        for i, item in enumerate(value if many else [value]):
            k = f"{key}.{i}" if many else key
            if isinstance(item, Path):
                yield k, item
            elif isinstance(item, BaseModel):
                yield from _paths(item, k + ".")


def site_files(cfg: SiteConfig) -> list[tuple[str, Path]]:
    """The files ``cfg`` names, by key (the config file itself as ``site.yaml``)."""
    named = [(k, p) for k, p in _paths(cfg, "") if k not in _FOLDER_KEYS and k != "source"]
    key = cfg.federation.auth_private_key
    if key is not None:
        named.append(("federation.auth_private_key (.pub)", Path(f"{key}.pub")))
    if cfg.source is not None:
        named.append(("site.yaml", Path(cfg.source)))
    return named


def site_folders(cfg: SiteConfig) -> list[tuple[str, Path]]:
    """The folders no output may go into, by key."""
    return [("site.dicom_dir", cfg.site.dicom_dir), ("site.state_dir", cfg.site.state_dir)]


def _no_links(path: Path, what: str) -> None:
    """Refuse ``path`` if any existing component of it (``path`` itself included) is a link."""
    parts = path.parts
    for i in range(1, len(parts) + 1):
        p = Path(*parts[:i])
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise UnsafeOutput(f"{what}: {printable(str(p))}: cannot check ({type(exc).__name__})") from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeOutput(f"{what}: {printable(str(p))} is a symbolic link; give a path without links")


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(out: Path, sites: SiteConfig | Sequence[SiteConfig] = (), *, protect: Iterable[Path] = (),
                 folder: bool = False, names: Iterable[str] = (), what: str = "--out") -> Path:
    """``out`` (absolute, not resolved) if a command may write it; else :class:`UnsafeOutput`.

    ``sites``: the site configs whose files and folders are off limits. ``protect``: more files
    (the model being applied). ``folder``: ``out`` is a folder the command writes ``names`` into
    (each checked as a file); otherwise ``out`` is one file.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    sites = [sites] if isinstance(sites, SiteConfig) else list(sites)
    targets = [out / n for n in names] if folder else [out]
    _no_links(out, what)
    if folder and out.exists() and not out.is_dir():
        raise UnsafeOutput(f"{what}: {printable(str(out))} is not a folder")
    for t in targets:
        _no_links(t, what)
        if t.is_dir():
            raise UnsafeOutput(f"{what}: {printable(str(t))} is a folder; give a file name")
    real = out.resolve()
    for cfg in sites:
        for key, f in site_folders(cfg):
            if real.is_relative_to(Path(f).resolve()):
                raise UnsafeOutput(f"{what}: {printable(str(out))} is inside {key}; write elsewhere")
    own = [(key, Path(p)) for cfg in sites for key, p in site_files(cfg)]
    own += [("the model's", Path(p)) for p in protect]
    for t in targets:
        rt = t.resolve()
        for key, p in own:
            if _same(rt, p):
                raise UnsafeOutput(f"{what}: {printable(str(t))} is one of the site's or the model's own files "
                                   f"({key})")
    return out


def open_folder(folder: Path, *, what: str = "--out") -> int:
    """An ``O_DIRECTORY`` descriptor of ``folder`` (absolute), opened from ``/`` one component at
    a time without following links; missing folders are made (mode 0777 less the umask, as
    ``mkdir -p``). The caller closes it."""
    folder = Path(os.path.abspath(folder))
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        for i, name in enumerate(folder.parts[1:], start=2):
            try:
                nxt = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                nxt = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                here = printable(str(Path(*folder.parts[:i])))
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeOutput(f"{what}: {here} is a symbolic link or not a folder") from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


__all__ = ["UnsafeOutput", "check_output", "open_folder", "site_files", "site_folders"]
