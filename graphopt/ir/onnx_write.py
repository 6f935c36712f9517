"""Writing ONNX files: atomic and memory-lean, weights written from where they lie.

Saving writes weights over 1 KB to ``<out>.data`` straight from where they are (ranges of the input's data file
are copied file to file; arrays are written from memory), so no protobuf message ever holds them: the model is
never copied whole in memory and tensors over 2 GB are fine. Tensors of 64 KB and more start on a 4 KB page (so
onnxruntime can memory-map them); smaller ones are packed (padding each to a page grew a model of many small
tensors several times over). Model and data are written into a temporary folder beside the output and moved into
place; nothing is left behind on failure.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import EncodeError
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.errors import OutputError, UsageError, first_line
from graphopt.ir.onnx_external import RAW_NUMPY, ExternalValues, Source, file_source
from graphopt.paths import through_links

EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the model file (onnx's own default)
_ALIGN = 4096  # data offsets of big tensors aligned to pages, so onnxruntime can memory-map them
_ALIGN_FROM = 64 * 1024  # ... from this size on: the padding is then at most 6 % of a tensor
_COPY_CHUNK = 16 * 2**20


def _copy_range(source: Source, out) -> None:
    out.flush()
    with open(source.path, "rb") as src:
        offset, left = source.offset, source.length
        try:
            while left:
                n = os.copy_file_range(src.fileno(), out.fileno(), left, offset)
                if n == 0:
                    raise OSError(errno.EIO, f"{source.path} ended early")
                offset, left = offset + n, left - n
        except OSError as exc:  # not supported here (another filesystem, an old kernel): copy through a buffer
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) or left != source.length:
                raise
            while left:
                chunk = os.pread(src.fileno(), min(left, _COPY_CHUNK), offset)
                if not chunk:
                    raise OSError(errno.EIO, f"{source.path} ended early") from None
                out.write(chunk)
                offset, left = offset + len(chunk), left - len(chunk)
        out.seek(0, os.SEEK_END)


def raw_type(const: gs.Constant) -> int | None:
    """The ONNX type of a Constant whose bytes can be written as they are, else None."""
    if getattr(const, "_export_dtype", None) is not None and const._export_dtype != const.dtype:
        return None  # graphsurgeon converts these (float32 -> bfloat16, ...) as it exports them
    values = const._values
    if isinstance(values, ExternalValues):  # its bytes on disk are already in ONNX's raw layout
        return values.meta.data_type if values.meta.data_type != TensorProto.STRING else None
    if not isinstance(values, np.ndarray) or values.dtype.hasobject:
        return None
    try:
        data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    except (KeyError, ValueError, TypeError):
        return None
    return data_type if data_type in RAW_NUMPY else None


def nbytes(const: gs.Constant) -> int:
    """The bytes of a Constant's values, without reading them."""
    values = const._values
    if isinstance(values, LazyValues):
        return int(values.nbytes)
    return int(values.nbytes) if isinstance(values, np.ndarray) else 0


def _write_values(const: gs.Constant, out) -> None:
    source = file_source(const._values)
    if source is not None:
        _copy_range(source, out)
        return
    array = np.ascontiguousarray(const.values)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    out.write(memoryview(array.reshape(-1)).cast("B") if array.size else b"")


def external_placeholder(name: str, data_type: int, dims, location: str, offset: int, length: int) -> LazyValues:
    """Values that graphsurgeon's exporter embeds as a reference to ``location`` (no bytes held)."""
    t = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        t.external_data.add(key=key, value=str(value))
    return LazyValues(t)


def export_with_references(consts: list[gs.Constant], export: Callable[[], onnx.ModelProto],
                           write: Callable[[gs.Constant, int, int], tuple[str, int]]) -> onnx.ModelProto:
    """``export()`` with every Constant in ``consts`` exported as an external reference: ``write(const, type,
    nbytes)`` stores its bytes somewhere and returns ``(location, offset)``. The graph is left as it was."""
    swapped = []
    try:
        for const in consts:
            data_type = raw_type(const)
            if data_type is None:
                continue
            size = nbytes(const)
            location, offset = write(const, data_type, size)
            swapped.append((const, const._values))
            const._values = external_placeholder(const.name, data_type, const.shape, location, offset, size)
        return export()
    finally:
        for const, values in swapped:
            const._values = values


def write_files(path: str, consts: list[gs.Constant], export: Callable[[], onnx.ModelProto], external: bool,
                reads: set[str], before_move: Callable[[str], None] | None = None) -> None:
    """Write the model ``export()`` gives to ``path``, atomically; with ``external``, every Constant of ``consts``
    over 1 KB goes to ``<path>.data`` (written from where it lies). ``reads``: files the model's values come from,
    which must not be overwritten. ``before_move(temporary_path)`` sees the written model (its data beside it)
    before it is moved into place, and the files it writes beside it move with it; what it raises propagates and
    nothing is moved. OutputError (UsageError for an
    output over an input) when writing fails; nothing is left behind."""
    path = through_links(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: cannot write: folder {folder} does not exist (create it first)")
    if os.path.isdir(path):
        raise OutputError(f"{path}: cannot write: it is a directory (give a file name)")
    for target in (path, os.path.join(folder, base + ".data")):
        if os.path.realpath(target) in reads:
            raise UsageError(f"{path}: writing it would overwrite {target}, which the model reads its weights "
                             f"from (choose another output name)")
    try:
        tmp = tempfile.mkdtemp(prefix=".graphopt-", dir=folder)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        try:
            written = _write_into(tmp, base, consts, export, external, path)
        except OSError as exc:
            raise _output_error(path, exc) from None
        if before_move is not None:
            before_move(os.path.join(tmp, base))
            written = sorted(set(os.listdir(tmp)) - set(written)) + written  # what it wrote beside: moved too
        try:
            _move_into_place(tmp, folder, written)
        except OSError as exc:
            raise _output_error(path, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _output_error(path: str, exc: OSError) -> OutputError:
    reason = exc.strerror or first_line(exc)
    hint = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space",
            errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions",
            errno.EROFS: "the folder is read-only; write elsewhere", errno.EISDIR: "give a file name",
            }.get(exc.errno, "check the output path")
    return OutputError(f"{path}: cannot write ({reason}) ({hint})")


def _write_into(tmp: str, base: str, consts: list[gs.Constant], export: Callable[[], onnx.ModelProto],
                external: bool, path: str) -> list[str]:
    """Write the model (and with ``external`` its data) into ``tmp``; returns the names written, data first."""
    written = []
    model = None
    if external:
        data_name = base + ".data"
        with open(os.path.join(tmp, data_name), "wb") as data:

            def write(const, data_type, size):
                offset = data.seek(0, os.SEEK_END)
                if size >= _ALIGN_FROM and offset % _ALIGN:
                    data.write(b"\0" * (_ALIGN - offset % _ALIGN))
                    offset = data.seek(0, os.SEEK_END)
                _write_values(const, data)
                if data.tell() - offset != size:
                    raise OSError(errno.EIO, f"tensor '{const.name}': wrote {data.tell() - offset} of {size} bytes")
                return data_name, offset

            model = export_with_references([c for c in consts if nbytes(c) > EXTERNAL_THRESHOLD], export, write)
            if data.tell() > 0:
                written.append(data_name)
    model = model if model is not None else export()  # (what export() raises is not protobuf's size limit)
    try:
        blob = model.SerializeToString()
    except (ValueError, EncodeError) as exc:  # protobuf: over 2 GB although the weights went out
        raise OutputError(f"{path}: cannot write: {first_line(exc)} (the graph alone is over 2 GB)") from None
    with open(os.path.join(tmp, base), "wb") as f:
        f.write(blob)
    return [*written, base]


def _move_into_place(tmp: str, folder: str, names: list[str]) -> None:
    """Move ``names`` from ``tmp`` into ``folder`` in order (the data first: the model file, moved last, is what
    makes the new data reachable). If a move fails, the files moved already are put back as they were."""
    done: list[tuple[str, str | None]] = []
    try:
        for name in names:
            final = os.path.join(folder, name)
            backup = None
            if os.path.lexists(final):
                backup = os.path.join(tmp, name + ".previous")
                try:
                    os.link(final, backup, follow_symlinks=False)
                except OSError:
                    backup = None
            os.replace(os.path.join(tmp, name), final)
            done.append((final, backup))
    except OSError:
        for final, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, final)
                else:
                    os.remove(final)
            except OSError:
                pass
        raise
