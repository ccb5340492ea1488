"""The one resolver of paths: every path a service reads goes through here.

Two kinds of paths reach the services, and both end in a real path (absolute, symlinks followed)
that lies inside a trusted root, or in ``PathRefused``:

- **user paths**, typed into a request (a dataset folder, an embedding map's label source):
  absolute, or relative to a data root (ORL_DATA_ROOTS). ``resolve_user_path`` refuses empty and
  NUL-containing paths, any ``..`` segment (also percent-encoded, once or repeatedly: a client,
  proxy or a later tool may decode it), and anything that resolves outside every data root,
  a symlink that leads out included. An absolute path outside the roots is refused before its
  existence is looked at, so the answer never tells whether a file outside the roots exists.
- **stored paths**, written by the services into rows (an image's ``rel_path`` under its dataset
  folder, an artifact's ``path`` under ORL_ARTIFACTS_DIR). Rows can be edited and folders
  replaced by links after the fact, so ``stored_path`` checks them again at every read:
  containment is decided on the resolved path, before existence.

A refusal names the field it is about (``PathRefused.field``), so the API's 4xx says what to change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

MAX_PATH_CHARS = 4096
_SEGMENTS = re.compile(r"[\\/]+")


class PathRefused(ValueError):
    """A path that may not be used; the message says why and what to do. ``field`` names the
    request field it came from ("path", "params.labels"), when there is one."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason, self.field = reason, field


def _has_dotdot(p: str) -> bool:
    return any(seg == ".." for seg in _SEGMENTS.split(p))


def _fully_decoded(raw: str) -> str:
    """``raw`` percent-decoded until it stops changing: %252e%252e -> %2e%2e -> .."""
    decoded, prev = raw, None
    for _ in range(16):  # each round shortens the string; 16 rounds is far beyond any real encoding
        if decoded == prev:
            break
        prev, decoded = decoded, unquote(decoded)
    return decoded


def _roots_text(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def _inside_any(real: Path, roots: list[Path]) -> bool:
    return any(real.is_relative_to(r) for r in roots)


def _link_out(raw: str, noun: str, roots: list[Path]) -> str:
    # The target is not named: it lies outside what this API may show.
    return (f"{raw!r} is a symlink that leads outside the data roots; put the {noun} itself under "
            f"{_roots_text(roots)} or add its folder to ORL_DATA_ROOTS")


def resolve_user_path(raw: str, roots: list[Path], *, field: str, noun: str = "file or folder",
                      folder: bool = False) -> Path:
    """The real path of an existing file or folder under a data root, for a path typed by a user.

    ``roots`` are the data roots, resolved (``Settings.data_root_paths``); ``raw`` is absolute or
    relative to one of them (the first where it exists). ``folder``: it must be a folder. ``noun``
    names what is asked for in the messages. Raises PathRefused naming ``field``.
    """
    def refuse(reason: str) -> PathRefused:
        return PathRefused(reason, field)

    if not roots:
        raise refuse("no data roots are configured; set ORL_DATA_ROOTS to the folders datasets may live in")
    if not raw or not raw.strip():
        raise refuse(f"path is empty; give a {noun} under one of the data roots")
    if len(raw) > MAX_PATH_CHARS or "\x00" in raw:
        raise refuse("path is too long or contains a NUL byte")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON allows "\udb09"): no file name can hold it, and the OS calls
        # below would fail on it (found by the fuzzer: a 500).
        raise refuse("path is not valid Unicode text (it holds a lone surrogate); give a real file name") from None
    decoded = _fully_decoded(raw)
    if "\x00" in decoded:
        raise refuse("path contains an encoded NUL byte")
    if _has_dotdot(raw) or _has_dotdot(decoded):
        raise refuse(f"path must not contain '..' (plain or percent-encoded); give the {noun}'s full path "
                     f"or its path relative to a data root ({_roots_text(roots)})")
    # "~" is not expanded: the API server's home folder means nothing to a client, and
    # "~unknownuser" made pathlib raise (a 500, found by the fuzzer). It is a plain name here.
    p = Path(raw)
    if p.is_absolute():
        # Where it leads (links followed, the missing tail kept as written) decides first: the same
        # answer for an existing and a missing path outside the roots.
        if not _inside_any(p.resolve(), roots):
            if _inside_any(Path(os.path.normpath(p)), roots):
                raise refuse(_link_out(raw, noun, roots))
            raise refuse(f"{raw!r} is outside the data roots; put it under {_roots_text(roots)} or add its folder "
                         "to ORL_DATA_ROOTS")
        candidates = [p]
    else:
        candidates = [r / p for r in roots]
    target = next((c for c in candidates if c.exists()), None)
    if target is None:
        raise refuse(f"{noun} not found: {raw!r}; give an existing {noun} under {_roots_text(roots)}")
    real = target.resolve(strict=True)
    if not _inside_any(real, roots):
        raise refuse(_link_out(raw, noun, roots))
    if folder and not real.is_dir():
        raise refuse(f"{raw!r} is a file, not a folder; give the folder that contains the images")
    return real


def stored_path(path: str | Path, root: Path, *, what: str) -> Path:
    """The real path of a path stored in a row, relative to ``root`` (or absolute), when it lies
    inside ``root`` with symlinks followed; PathRefused otherwise (``what`` names it in the
    message). Whether the file exists is left to the caller: it is decided after containment."""
    text = str(path)
    if not text or "\x00" in text:
        raise PathRefused(f"{what} has an empty path or one with a NUL byte")
    p = Path(text)
    real = (p if p.is_absolute() else root / p).resolve()
    if not real.is_relative_to(root.resolve()):
        raise PathRefused(f"{what}'s path leads outside {root}")
    return real


def dataset_folder(dataset_path: str | Path, roots: list[Path]) -> Path:
    """A registered dataset's folder, checked again at read time: the roots may have changed, and
    the folder may have been replaced by a link that leads out of them."""
    base = Path(dataset_path)
    real = base.resolve()
    if not _inside_any(real, roots):
        raise PathRefused(f"dataset folder {base} is no longer under the data roots ({_roots_text(roots)})")
    return real


def image_file(dataset_path: str | Path, rel_path: str, roots: list[Path]) -> Path:
    """The file of a registered image: a plain relative path inside its dataset folder, with
    symlinks followed, inside the data roots."""
    base = dataset_folder(dataset_path, roots)
    if not rel_path or _has_dotdot(rel_path) or Path(rel_path).is_absolute():
        raise PathRefused(f"image path {rel_path!r} is not a plain relative path")
    try:
        return stored_path(rel_path, base, what=f"image {rel_path!r}")
    except PathRefused:
        raise PathRefused(f"image {rel_path!r} resolves outside its dataset folder") from None
