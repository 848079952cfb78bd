"""Write every output to a temporary name and rename it only when all have been written."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import SynthMorphError


def _suffix(path: Path) -> str:
    """The file type suffix in its original spelling (``.nii.gz`` counts as one)."""
    name = path.name
    for double in (".nii.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return name[-len(double):]
    return path.suffix


class OutputSet:
    """Collect temporary files for several outputs and commit them together.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> with OutputSet() as out:
    ...     _ = out.temp(d / "a.txt").write_text("x")
    >>> sorted(p.name for p in d.iterdir())
    ['a.txt']
    """

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []

    @staticmethod
    def check_writable(path: str | Path) -> None:
        """Fail early, before any computation, when ``path`` cannot be written."""
        path = Path(path)
        parent = path.parent if str(path.parent) else Path(".")
        try:
            if not parent.is_dir():
                raise SynthMorphError(f"{path}: output directory {parent} does not exist")
            if path.is_dir():
                raise SynthMorphError(f"{path}: is a directory, cannot write an output there")
            writable = os.access(parent, os.W_OK) and (
                not path.exists() or os.access(path, os.W_OK))
        except OSError as err:  # e.g. a file name too long for the file system
            raise SynthMorphError(f"{path}: cannot write here ({err.strerror})") from None
        if not writable:
            raise SynthMorphError(f"{path}: cannot write here (permission denied)")

    @staticmethod
    def check_distinct(outputs, inputs) -> None:
        """Refuse, before any work, an output that is one of the inputs (the same file by
        any name: symlink, hard link, another spelling of the path) or another output.

        ``outputs`` and ``inputs`` are ``(what, path)`` pairs, ``what`` naming the flag or
        argument in the message.

        >>> import tempfile; d = Path(tempfile.mkdtemp()); _ = (d / "in.nii").write_text("x")
        >>> OutputSet.check_distinct([("-o", d / "out.nii")], [("MOVING", d / "in.nii")])
        >>> OutputSet.check_distinct([("-o", d / "." / "in.nii")], [("MOVING", d / "in.nii")])
        Traceback (most recent call last):
        ...
        synthmorph_nipype.errors.SynthMorphError: ...in.nii: -o would overwrite MOVING ...
        """
        given = [(what, Path(path)) for what, path in inputs if path]
        seen: list[tuple[str, Path]] = []
        for what, path in outputs:
            if not path:
                continue
            path = Path(path)
            for other, source in given:
                if _same_file(path, source):
                    raise SynthMorphError(f"{path}: {what} would overwrite {other} "
                                          f"({source}); choose another output name")
            for other, earlier in seen:
                if _same_file(path, earlier):
                    raise SynthMorphError(f"{path}: {what} and {other} name the same file; "
                                          "give each output its own name")
            seen.append((what, path))

    def temp(self, path: str | Path) -> Path:
        """A temporary path next to ``path``, with the same suffix (formats follow it)."""
        path = Path(path)
        stem = path.name[:100]  # the temporary name must not exceed the final one's limit
        tmp = path.parent / f".{stem}.{uuid.uuid4().hex[:8]}.tmp{_suffix(path)}"
        self._pending.append((tmp, path))
        return tmp

    def commit(self) -> None:
        for _, final in self._pending:
            if final.is_dir():
                raise IsADirectoryError(21, "is a directory", str(final))
        done: list[Path] = []
        try:
            for tmp, final in self._pending:
                os.replace(tmp, final)
                done.append(final)
        except OSError:
            for final in done:  # all or nothing: take back what was already renamed
                final.unlink(missing_ok=True)
            raise
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        self._pending.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except OSError as err:
                self.discard()
                raise SynthMorphError(
                    f"{err.filename}: cannot write output ({err.strerror})") from None
        else:
            self.discard()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (existing: by inode; else by resolved path)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def atomic_copy(src: str | os.PathLike, dst: Path) -> None:
    """Copy ``src`` to ``dst`` under a temporary name beside it, then rename: a reader
    never sees half a file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with OutputSet() as out:
        shutil.copyfile(src, out.temp(dst))


def atomic_write_text(dst: Path, text: str) -> None:
    """Write ``text`` to ``dst`` the same way."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with OutputSet() as out:
        out.temp(dst).write_text(text)
