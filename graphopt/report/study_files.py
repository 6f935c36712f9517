"""Study folders: what a sweep's trials load, and how a study scores a model against its reference.

A sweep (int8 sensitivity on ONNX or FX, the prune-ratio search) writes its model, its N evaluation samples (and
labels) and its settings to a folder, so that a trial — a module-level function of a JSON item naming that folder —
can run in another process or on a Ray worker and load them once (:func:`load_once`). The folder is named by the
hash of everything it holds (:func:`study_folder`): the same study, the same folder, the same cached trials, so a
rerun resumes. Those folders live under :func:`studies_root` (``$GRAPHOPT_STUDY_DIR``, else
``$TMPDIR/graphopt-studies``). graphopt marks the folders it names itself (:data:`AUTO_MARKER`) and keeps the newest
:data:`KEEP_STUDIES` of them, removing older ones unused for an hour (:func:`prune_studies`); a folder the caller
names is never removed.

:class:`Scored` is what every kind of study shares once it has its reference outputs: output SQNR and cosine
against the reference (all float outputs together) and, with labels, top-1 accuracy in points.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np

from graphopt.backends.base import check_classes
from graphopt.errors import OutputError, UsageError
from graphopt.numeric import cosine_similarity, sqnr_db, top1_accuracy

__all__ = ["AUTO_MARKER", "KEEP_STUDIES", "ROOT_ENV", "Scored", "calibration_arrays", "eval_arrays", "load_once",
           "prune_studies", "read_study", "scoring_samples", "studies_root", "study_folder", "write_study"]

KEEP_STUDIES = 8  # study folders graphopt chose that are kept under studies_root(), newest first
ROOT_ENV = "GRAPHOPT_STUDY_DIR"  # where graphopt puts the study folders it names (default: the temp dir's)
AUTO_MARKER = ".graphopt-auto"  # in a study folder graphopt chose (only such folders are ever removed)
IDENTITY = "study.id"  # in a study folder: the hash of what it studies (a named folder holds one study)
LABELS = "__labels__"  # the labels' array in a study's data.npz
_LOADED: dict[str, Any] = {}  # the studies this process holds, by folder (a trial loads each once)


def studies_root() -> str:
    """The folder that holds the study folders graphopt names itself."""
    return os.environ.get(ROOT_ENV) or os.path.join(tempfile.gettempdir(), "graphopt-studies")


def study_folder(prefix: str, model: bytes, settings: Any, data: dict[str, np.ndarray], labels,
                 folder: str | None = None) -> str:
    """``folder`` (created, unmarked: the caller's) or, when None, a folder under :func:`studies_root` named
    ``prefix`` + the hash of ``model`` (bytes), ``settings`` (JSON), ``data`` and ``labels`` (created, marked, and
    the oldest marked folders beside it pruned)."""
    digest = hashlib.sha256(model)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for key in sorted(data):
        digest.update(key.encode() + np.ascontiguousarray(data[key]).tobytes())
    if labels is not None:
        digest.update(np.asarray(labels).tobytes())
    if folder is not None:
        _make(folder, "the study folder")
        marker = os.path.join(folder, AUTO_MARKER)
        if os.path.exists(marker):  # a folder the caller names is never removed
            os.remove(marker)
        _claim(folder, digest.hexdigest())
        return folder
    folder = os.path.join(studies_root(), prefix + digest.hexdigest()[:16])
    _make(folder, f"the studies folder (${ROOT_ENV} sets another)")
    open(os.path.join(folder, AUTO_MARKER), "w").close()
    os.utime(folder)
    prune_studies(os.path.dirname(folder), keep=KEEP_STUDIES, current=folder)
    return folder


def _make(folder: str, what: str) -> None:
    """``folder`` created (with its parents); an OutputError naming ``what`` when it cannot be."""
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write {what} ({exc.strerror or exc})") from None


def _claim(folder: str, identity: str) -> None:
    """A folder the caller names holds one study: its identity (the hash an automatic folder is named by) is
    written there once, and a different study in it is refused — its cached trials are another model's or another
    data's results, which a sweep would reuse as this one's."""
    path = os.path.join(folder, IDENTITY)
    try:
        with open(path) as f:
            held = f.read().strip()
    except FileNotFoundError:
        held = None
    if held is not None and held != identity:
        raise UsageError(f"{folder}: this folder holds the study of another model, data, placement or backend "
                         f"(its cached trials would be taken as this one's): give an empty or a new folder")
    if held is None:
        with open(path, "w") as f:
            f.write(identity + "\n")


def write_study(folder: str, model_file: str, model: bytes, data: dict[str, np.ndarray], labels,
                meta: dict) -> None:
    """The model (``model_file`` in ``folder``), the samples and labels (data.npz) and ``meta`` (study.json)."""
    with open(os.path.join(folder, model_file), "wb") as f:
        f.write(model)
    np.savez(os.path.join(folder, "data.npz"), **data, **({LABELS: np.asarray(labels)} if labels is not None else {}))
    with open(os.path.join(folder, "study.json"), "w") as f:
        json.dump(meta, f)


def backend_record(backend) -> dict[str, Any]:
    """What a study keeps of its backend (in its folder's hash and its study.json): its name, its spec (options),
    what its constructor was given and its runtime's versions (a new onnxruntime: a new study);
    :func:`read_study` makes that very backend again from it."""
    return {"backend": backend.name, "backend_spec": backend.spec(), "backend_args": backend.init_args(),
            "runtime": backend.runtime_versions()}


def read_study(folder: str) -> tuple[dict, dict[str, np.ndarray], np.ndarray | None, Any, Any]:
    """(meta, samples, labels or None, registry, backend) of the study in ``folder`` (its backend made again from the
    spec in its meta, options included, from the default registry, then with its constructor's arguments); its
    time is touched (a study in use is new)."""
    from graphopt.backends import get_backend
    from graphopt.plugins import default_registry

    try:
        os.utime(folder)
    except OSError:  # a read-only folder: nothing prunes it either
        pass
    with open(os.path.join(folder, "study.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(folder, "data.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    registry = default_registry()
    backend = get_backend(registry, meta.get("backend_spec", meta["backend"]))
    if meta.get("backend_args"):  # what its constructor was given: the study's very backend
        backend = backend.remade(meta["backend_args"])
    return meta, arrays, arrays.pop(LABELS, None), registry, backend


def load_once(folder: str, load: Callable[[str], Any], study: Any = None) -> Any:
    """The study of ``folder`` this process holds: ``study`` when given (just created: remembered), else the one
    loaded before, else ``load(folder)``."""
    if study is not None:
        _LOADED[folder] = study
    elif folder not in _LOADED:
        _LOADED[folder] = load(folder)
    return _LOADED[folder]


def prune_studies(root: str, *, keep: int = KEEP_STUDIES, current: str | None = None,
                  min_age_s: float = 3600.0) -> list[str]:
    """Remove the study folders under ``root`` that graphopt chose (they hold :data:`AUTO_MARKER`), but the newest
    ``keep``, ``current`` and any used in the last ``min_age_s`` seconds (a sweep another process still runs);
    returns the folders removed. A folder without the marker (one a user named) is never touched."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path) and os.path.isfile(os.path.join(path, AUTO_MARKER)):
            found.append((os.path.getmtime(path), path))
    found.sort(reverse=True)
    removed, now = [], time.time()
    for mtime, path in found[keep:]:
        if path != current and now - mtime > min_age_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class Scored:
    """What every kind of study shares: :meth:`load` (once per process, through the kind's ``_read(folder)``) and
    scores against the reference outputs (a study has ``data``, ``labels`` and ``reference()``)."""

    data: dict[str, np.ndarray]
    labels: np.ndarray | None

    @classmethod
    def load(cls, folder: str):
        """The study saved in ``folder`` (once per process)."""
        return load_once(folder, cls._read)

    @classmethod
    def _read(cls, folder: str):
        raise NotImplementedError

    @property
    def samples(self) -> int:
        return len(next(iter(self.data.values())))

    def reference(self) -> list[np.ndarray]:
        raise NotImplementedError

    def metrics(self, outputs: list[np.ndarray]) -> dict[str, float | None]:
        """Output SQNR (dB) and cosine against the reference (all float outputs together), top-1 accuracy in
        points with labels."""
        ref = self.reference()
        floats = [i for i, o in enumerate(ref) if np.issubdtype(np.asarray(o).dtype, np.floating)]
        a = np.concatenate([np.ravel(ref[i]) for i in floats]).astype(np.float64)
        b = np.concatenate([np.ravel(outputs[i]) for i in floats]).astype(np.float64)
        if self.labels is not None:
            check_classes(self.labels, outputs[0])
        acc = None if self.labels is None else 100.0 * top1_accuracy(outputs[0], self.labels)
        return {"sqnr_db": sqnr_db(a, b), "cosine": cosine_similarity(a, b), "accuracy": acc}

    def fp32_accuracy(self) -> float | None:
        if self.labels is None:
            return None
        check_classes(self.labels, self.reference()[0])
        return 100.0 * top1_accuracy(self.reference()[0], self.labels)


def eval_arrays(path: str, labels_key: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Labelled evaluation data: the arrays of the .npz at ``path``, its ``labels_key`` array apart."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"eval={path}: not a readable .npz file ({exc})") from None
    if labels_key not in arrays:
        raise UsageError(f"{path} has no labels array '{labels_key}' (it has: {', '.join(sorted(arrays))})")
    labels = arrays.pop(labels_key)
    from graphopt.report.metrics import check_labelled

    return arrays, check_labelled(arrays, labels, f"eval={path}: ")


def calibration_arrays(calibration) -> dict[str, np.ndarray]:
    """The calibration data (a CalibrationData: ``.batches()``) as one array per input."""
    parts: dict[str, list] = {}
    for batch in calibration.batches():
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def scoring_samples(eval_path: str, labels_key: str, calibration, samples: int
                    ) -> tuple[dict[str, np.ndarray], np.ndarray | None] | None:
    """What a pass's search scores its candidates on: the first ``samples`` samples of the labelled .npz at
    ``eval_path`` when given (its ``labels_key`` array apart), else of the calibration data (no labels); None when
    there is neither."""
    if eval_path:
        data, labels = eval_arrays(eval_path, labels_key)
    elif calibration is not None:
        data, labels = calibration_arrays(calibration), None
    else:
        return None
    n = min(samples, len(next(iter(data.values()))))
    return {k: v[:n] for k, v in data.items()}, None if labels is None else np.asarray(labels).reshape(-1)[:n]
