"""Where a run reads and writes, checked before any pass runs, and writes that leave nothing half-done.

No file graphopt reads is ever written: every output (``-o`` and its ``.data``, ``--json``, ``--snapshot-dir``'s
files, ``--reproducer``'s files) is compared by real path — links resolved, hard links caught by inode — with
every input (the model, each external data file it reads, calibration and evaluation data, the files inside a
calibration folder, files named in pass options, a recipe), and with the other outputs. An output's folder must
exist and be writable, and an output that exists must be a regular file (not a directory, a device such as
/dev/null, a pipe or a broken link); all of it is known before the first pass, so a bad target costs nothing
and leaves nothing. Files are written beside their final place under a temporary name and moved into place at
the end (:func:`atomic_write` / :class:`Staged`); a symbolic link is written through, to its target, as a shell's
``>`` would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from graphopt.errors import GraphoptError, InputError, OutputError, UsageError


def file_sha256(*paths: str) -> str:
    """One sha256 over the files' bytes, in order (a model file and its external data files), read in 1 MiB
    blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def require_regular(path: str, what: str = "input") -> None:
    """An input graphopt reads must be a regular file (or a link to one) when it exists: a device (/dev/zero) or a
    pipe would be read without end, or only once where graphopt reads twice. InputError otherwise; a missing path
    is left to the caller, which says that its own way."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        raise InputError(f"{path}: the {what} is not a regular file (a device, a pipe or a socket); give a file")


def real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def through_links(path: str) -> str:
    """Where writing ``path`` goes: its target when it is a symbolic link (as a shell's ``>``), else itself."""
    path = os.fspath(path)
    return real(path) if os.path.islink(path) else path


@dataclass
class IOPlan:
    """The files a run reads (``inputs``: (what, path)) and will write (``outputs``: (flag, path)), and the
    folders it writes into (``folders``: (flag, path), created if missing)."""

    inputs: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    folders: list[tuple[str, str]] = field(default_factory=list)
    input_folders: list[tuple[str, str]] = field(default_factory=list)  # read whole (a folder of images)

    def read(self, what: str, path: str | None) -> None:
        if path is None:
            return
        if os.path.isdir(path):
            self.input_folders.append((what, path))
            for root, _, files in os.walk(path):
                self.inputs += [(what, os.path.join(root, f)) for f in files]
        else:
            self.inputs.append((what, path))

    def write(self, flag: str, path: str | None) -> None:
        if path is not None:
            self.outputs.append((flag, path))

    def write_into(self, flag: str, folder: str | None, names: list[str]) -> None:
        if folder is None:
            return
        self.folders.append((flag, folder))
        self.outputs += [(flag, os.path.join(folder, n)) for n in names]

    def check(self) -> None:
        """Refuse (UsageError) an output that is an input or another output; refuse (OutputError) an output
        whose folder is missing or not writable, or that is a directory."""
        inputs = [(what, path, real(path)) for what, path in self.inputs]
        seen: dict[str, str] = {}
        for flag, path in self.outputs:
            target = real(path)
            for what, inpath, inreal in inputs:
                if target == inreal or _same_inode(target, inreal):
                    raise UsageError(f"{flag} {path}: is the {what} ({inpath}); graphopt never writes a file it "
                                     f"reads (choose another path)")
            for what, folder in self.input_folders:
                if target.startswith(real(folder) + os.sep):
                    raise UsageError(f"{flag} {path}: is inside the {what} folder {folder}, which graphopt reads "
                                     f"(write elsewhere)")
            if target in seen:
                also = "written twice by" if seen[target] == flag else "also the output of"
                raise UsageError(f"{flag} {path}: is {also} {seen[target]} (give them different paths)")
            seen[target] = flag
        for flag, folder in self.folders:
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise OutputError(f"{flag} {folder}: exists and is not a folder (give a folder path)")
            parent = folder if os.path.isdir(folder) else _existing_parent(folder)
            _check_name_lengths(flag, folder, parent)
            _check_writable(flag, folder, parent)
        for flag, path in self.outputs:
            inside = any(path.startswith(os.path.join(f, "")) for _, f in self.folders)
            if inside and not os.path.lexists(path):
                continue  # a new file in a folder checked above (created later)
            if os.path.isdir(path):
                raise OutputError(f"{flag} {path}: is a directory (give a file path)")
            if os.path.lexists(path) and not os.path.isfile(path):
                raise OutputError(f"{flag} {path}: exists and is not a regular file (a device, a pipe or a broken "
                                  f"link: graphopt replaces a file, it does not write into one; give a file path)")
            folder = os.path.dirname(real(path))  # a link is written through: its target's folder takes the file
            if not os.path.isdir(folder):
                raise OutputError(f"{flag} {path}: folder {folder} does not exist (create it first)")
            _check_writable(flag, path, folder)


def _same_inode(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_name_lengths(flag: str, folder: str, parent: str) -> None:
    """A folder to create whose name is longer than the file system takes: said now, not after the passes."""
    try:
        longest = os.statvfs(parent).f_namemax
    except OSError:
        return
    for part in os.path.relpath(os.path.abspath(folder), os.path.abspath(parent)).split(os.sep):
        if len(os.fsencode(part)) > longest:
            raise OutputError(f"{flag} {folder}: a name longer than {longest} bytes (choose a shorter one)")


def _check_writable(flag: str, path: str, folder: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".graphopt-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def atomic_write(path: str, text: str, flag: str = "output") -> None:
    """Write ``text`` to ``path`` (a link: to its target) through a temporary file in the same folder, then move it
    into place."""
    path = through_links(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it: mkstemp's 0600 hid reports and recipes
        os.replace(tmp, path)
    except OSError as exc:
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def named_as(staged_path: str, given: str):
    """graphopt errors raised in the block name ``given`` (the path the user gave) where they say ``staged_path``."""
    try:
        yield
    except GraphoptError as exc:
        exc.args = tuple(a.replace(staged_path, given) if isinstance(a, str) else a for a in exc.args)
        raise


class Staged:
    """A temporary folder beside ``path`` to write a file and its companions (external data) into; ``commit``
    moves them into place (companions first, the file last), ``discard`` removes everything."""

    def __init__(self, path: str):
        self.given = path
        self.path = os.path.abspath(through_links(path))
        self.folder = os.path.dirname(self.path)
        try:
            self.tmp = tempfile.mkdtemp(prefix=".graphopt-", dir=self.folder)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write in {self.folder} ({exc.strerror or exc})") from None

    @property
    def staged_path(self) -> str:
        """Where to write the file: same name, in the temporary folder (so external data is named after it)."""
        return os.path.join(self.tmp, os.path.basename(self.path))

    def named(self):
        """Errors raised while writing the staged file name the path the user gave, not the temporary one."""
        return named_as(self.staged_path, self.given)

    def commit(self) -> list[str]:
        names = sorted(os.listdir(self.tmp), key=lambda n: n == os.path.basename(self.path))
        try:
            for name in names:
                os.replace(os.path.join(self.tmp, name), os.path.join(self.folder, name))
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot move the written file into place ({exc.strerror or exc})") \
                from None
        finally:
            self.discard()
        return [os.path.join(self.folder, n) for n in names]

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
