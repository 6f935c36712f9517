"""onnx's backend conformance models as a test suite for graphopt's ``fold`` pipeline.

    python benchmarks/conformance.py [--folder node,light] [-k substring] [--limit N] [--jobs 2]
                                     [--timeout 120] [--json out.json] [--modes check,no-check]

Every model of onnx's backend test data that onnxruntime itself runs (an ``InferenceSession`` builds and its
outputs match the case's expected outputs at onnx's tolerances; see ``_conformance_cases.py`` for the folders and
how each is fed) goes through ``graphopt run model.onnx --passes fold -o out.onnx``, once with the numeric check on
(the default) and once with ``--no-check``, exactly as a user types it (``graphopt.cli.main`` in a worker process,
killed after ``--timeout`` seconds). Each run is then one of:

- ``folded``: exit 0, the written model passes ``onnx.checker.check_model(full_check=True)``, and onnxruntime on
  it, fed the case's own inputs, gives the case's expected outputs (same tolerance);
- ``note``: the same, but graphopt printed a ``warning:`` (an equivalent model written with a note);
- ``refused``: graphopt refused cleanly: exactly one ``graphopt: error:`` line, a documented exit code 2-7,
  nothing written;
- ``WRONG``: exit 0 but the written model is missing, rejected by the checker, fails on onnxruntime or gives other
  outputs; or a refusal that was not clean (left a file behind, several error lines);
- ``CRASH``: "internal error" (exit 70), an undocumented exit code, a traceback, a timeout, a dead worker, or the
  input file's bytes changed.

Prints the counts per folder and class for each mode, then every WRONG / CRASH / refused run with its one-line
reason, and the reasons grouped by cause. ``--json PATH`` writes every case and run. Models are copied into a
temporary folder first (graphopt never sees onnx's or the cache's files). Exit status: 0 when no run is WRONG or
CRASH, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing.connection import wait

import _conformance_cases as cc
from _conformance_report import MODES, format_summary, summarize

DOCUMENTED_EXITS = range(2, 8)


# -- one run, inside a worker -------------------------------------------------------------------------------------
def baseline(case: cc.Case) -> dict:
    """Whether onnxruntime runs the case as onnx's runner would; ``{"runs": bool, "reason": str|None}``."""
    import onnx

    try:
        model = onnx.load(case.model)
        sets = cc.data_sets(case, model)
    except Exception as exc:
        return {"runs": False, "reason": f"data: {cc._line(exc)}"}
    reason = cc.run_onnxruntime(case.model, sets, case.rtol, case.atol)
    input_valid = True
    try:
        onnx.checker.check_model(case.model, full_check=True)
    except Exception:
        input_valid = False
    return {"runs": reason is None, "reason": reason, "input_valid": input_valid}


def run_fold(case: cc.Case, mode: str, workdir: str, input_valid: bool = True, passes: str = "fold") -> dict:
    """``graphopt run <copy of the model> --passes fold -o out.onnx [--no-check]`` and its classification."""
    import onnx

    from graphopt.cli import main

    folder = tempfile.mkdtemp(prefix="case-", dir=workdir)
    try:
        src = os.path.join(folder, "model.onnx")
        shutil.copyfile(case.model, src)
        digest = _sha(src)
        out = os.path.join(folder, "out.onnx")
        argv = ["run", src, "--passes", passes, "-o", out] + (["--no-check"] if mode == "no-check" else [])
        stdout, stderr = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        try:
            with redirect_stdout(stdout), redirect_stderr(stderr):
                rc = main(argv)
        except BaseException as exc:  # SystemExit or anything main() let through
            if isinstance(exc, KeyboardInterrupt):
                raise
            rc = None
            stderr.write(traceback.format_exc())
        seconds = time.perf_counter() - start
        record = {"rc": rc, "seconds": round(seconds, 3), "stderr": stderr.getvalue()[-2000:],
                  "warnings": [line for line in stdout.getvalue().splitlines() if line.startswith("warning:")]}
        record.update(_nodes(stdout.getvalue()))
        if _sha(src) != digest:
            return {**record, "class": "CRASH", "reason": "the input file changed"}
        record.update(_classify(case, rc, stderr.getvalue(), out, record["warnings"], input_valid, onnx))
        return record
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _classify(case, rc, stderr: str, out: str, warnings: list[str], input_valid: bool, onnx) -> dict:
    errors = [line for line in stderr.splitlines() if line.startswith("graphopt: error:")]
    if rc is None or "Traceback (most recent call last)" in stderr:
        return {"class": "CRASH", "reason": "traceback: " + _last_line(stderr)}
    if rc == 70 or "graphopt: internal error" in stderr:
        return {"class": "CRASH", "reason": f"exit {rc}: " + _last_line(stderr)}
    if rc != 0:
        if rc not in DOCUMENTED_EXITS:
            return {"class": "CRASH", "reason": f"undocumented exit {rc}: " + _last_line(stderr)}
        if len(errors) != 1:
            return {"class": "WRONG", "reason": f"exit {rc} with {len(errors)} error lines: " + _last_line(stderr)}
        if os.path.exists(out):
            return {"class": "WRONG", "reason": f"exit {rc} but {os.path.basename(out)} was left behind"}
        return {"class": "refused", "reason": f"exit {rc}: {errors[0][len('graphopt: error: '):]}"}
    if not os.path.exists(out):
        return {"class": "WRONG", "reason": "exit 0 but no output file"}
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:
        if input_valid:  # held to the checker only when the input passes it
            return {"class": "WRONG", "reason": f"checker: {cc._line(exc)}"}
    try:
        model = onnx.load(out)
        sets = cc.data_sets(case, model)
    except Exception as exc:
        return {"class": "WRONG", "reason": f"output unreadable: {cc._line(exc)}"}
    reason = cc.run_onnxruntime(out, sets, case.rtol, case.atol)
    if reason:
        return {"class": "WRONG", "reason": reason}
    if warnings:
        return {"class": "note", "reason": warnings[0][len("warning: "):]}
    return {"class": "folded", "reason": None}


def _nodes(stdout: str) -> dict:
    before = re.search(r": onnx, (\d+) nodes", stdout)
    after = re.search(r"^wrote .*: (\d+) nodes", stdout, re.M)
    return {"nodes_before": int(before.group(1)) if before else None,
            "nodes_after": int(after.group(1)) if after else None}


def _last_line(text: str) -> str:
    lines = [s for s in text.strip().splitlines() if s.strip()]
    return lines[-1][:400] if lines else ""


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _serve(conn, workdir: str, log_path: str) -> None:
    """A worker: quiet C-level output into its log, then one task at a time from ``conn``."""
    import faulthandler
    import warnings

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    log = os.fdopen(fd, "w", buffering=1)
    faulthandler.enable(log)
    warnings.simplefilter("ignore")
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    _memoize_plugin_metadata()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        kind, case_dict, mode, input_valid, passes = task
        case = cc.Case.from_dict(case_dict)
        try:
            result = baseline(case) if kind == "baseline" else run_fold(case, mode, workdir, input_valid, passes)
        except Exception as exc:  # a bug in this script, not graphopt's: still a result
            result = {"class": "CRASH", "runs": False, "reason": f"harness: {type(exc).__name__}: {cc._line(exc)}"}
        conn.send(result)


def _memoize_plugin_metadata() -> None:
    """graphopt's plugin loading parses each entry point's distribution METADATA file several times on every
    ``main()`` (``graphopt.plugins._is_own``: measured at about four fifths of a run on a one-node model). The
    answer cannot change while the worker lives, so it is memoized here: the runs measured 2-3x faster, and
    nothing graphopt does with the answer changes."""
    import graphopt.plugins as plugins

    original, memo = plugins._is_own, {}

    def is_own(ep) -> bool:
        key = (ep.group, ep.name, ep.value)
        if key not in memo:
            memo[key] = original(ep)
        return memo[key]

    plugins._is_own = is_own


# -- the pool -------------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, mp, workdir: str, index: int):
        self.conn, child = mp.Pipe()
        log = os.path.join(workdir, f"worker-{index}.log")
        self.proc = mp.Process(target=_serve, args=(child, workdir, log), daemon=True)
        self.proc.start()
        child.close()
        self.task = None
        self.started = 0.0

    def send(self, task) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def run_suite(cases: list[cc.Case], modes=MODES, jobs: int = 2, timeout: float = 120.0, progress=None,
              passes: str = "fold") -> dict:
    """Baseline every case on onnxruntime, then run ``passes`` on each one it runs, in every mode. Returns
    ``{case id: {"case": ..., "baseline": ..., "runs": {mode: record}}}``."""
    mp = multiprocessing.get_context("spawn")  # workers import onnxruntime and graphopt themselves
    results = {c.id: {"case": c.to_dict(), "baseline": None, "runs": {}} for c in cases}
    queue = [("baseline", c.to_dict(), None, True, passes) for c in cases]
    queue.reverse()  # pop() from the end keeps the given order
    with tempfile.TemporaryDirectory(prefix="graphopt-conformance-") as workdir:
        workers = [_Worker(mp, workdir, i) for i in range(max(1, jobs))]
        try:
            while queue or any(w.task for w in workers):
                for w in workers:
                    if w.task is None and queue:
                        w.send(queue.pop())
                busy = [w for w in workers if w.task]
                remaining = min(timeout - (time.monotonic() - w.started) for w in busy)
                ready = wait([w.conn for w in busy], timeout=max(0.0, remaining))
                for i, w in enumerate(workers):
                    if not w.task:
                        continue
                    if w.conn in ready:
                        try:
                            result = w.conn.recv()
                        except (EOFError, OSError):
                            w.proc.join(5)
                            result = {"class": "CRASH", "runs": False,
                                      "reason": f"the worker died (exit {w.proc.exitcode})"}
                            workers[i] = _replace(w, mp, workdir, i)
                    elif time.monotonic() - w.started >= timeout:
                        result = {"class": "CRASH", "runs": False, "reason": f"timeout after {timeout:g} s"}
                        workers[i] = _replace(w, mp, workdir, i)
                    else:
                        continue
                    task, w.task = w.task, None
                    queue.extend(_record(results, task, result, modes, progress))
        finally:
            for w in workers:
                w.kill()
    return results


def _record(results: dict, task: tuple, result: dict, modes, progress) -> list[tuple]:
    """Store one finished task's result; returns the tasks it leads to (a baseline that runs: one per mode)."""
    kind, case_dict, mode, _, passes = task
    entry = results[f"{case_dict['folder']}/{case_dict['name']}"]
    if kind == "baseline":
        entry["baseline"] = result
        if not result.get("runs"):
            return []
        return [("fold", case_dict, m, result.get("input_valid", True), passes) for m in reversed(modes)]
    entry["runs"][mode] = result
    if progress:
        progress(cc.Case.from_dict(case_dict), mode, result)
    return []


def _replace(worker: _Worker, mp, workdir: str, index: int) -> _Worker:
    worker.kill()  # the caller still reads the finished task from the old one
    return _Worker(mp, workdir, index)


def select(cases: list[cc.Case], substring: str | None = None, limit: int | None = None,
           names: set[str] | None = None) -> list[cc.Case]:
    """Cases whose id contains ``substring`` (or whose name/id is in ``names``), at most ``limit`` per folder."""
    out, per_folder = [], Counter()
    for c in cases:
        if substring and substring not in c.id:
            continue
        if names is not None and c.name not in names and c.id not in names:
            continue
        if limit is not None and per_folder[c.folder] >= limit:
            continue
        per_folder[c.folder] += 1
        out.append(c)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", action="append", default=[],
                   help=f"folders to run, comma-separated or repeated (default: all of {', '.join(cc.FOLDERS)}; "
                        f"'real' is 'light')")
    p.add_argument("-k", dest="substring", help="only cases whose folder/name contains this")
    p.add_argument("--limit", type=int, help="at most this many cases per folder")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per onnxruntime or graphopt run (120)")
    p.add_argument("--modes", default=",".join(MODES), help="check,no-check (default both)")
    p.add_argument("--passes", default="fold", help="the pipeline to run (default fold; one pass to isolate a bug)")
    p.add_argument("--json", metavar="PATH", help="write every case, run and the summary as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run as it finishes")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through run_suite's finally: workers killed

    reason = cc.generator_available()
    folders = [f for text in args.folder for f in text.split(",") if f] or list(cc.FOLDERS)
    if reason and "node" in folders:
        print(f"skipping node: {reason}", file=sys.stderr)
        folders.remove("node")
    modes = tuple(m for m in args.modes.split(",") if m)
    if not set(modes) <= set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}")
    start = time.perf_counter()
    cases = select(cc.collect(folders), args.substring, args.limit)
    print(f"{len(cases)} cases; {args.jobs} jobs", flush=True)

    def progress(case, mode, run):
        if args.verbose or run["class"] in ("WRONG", "CRASH"):
            print(f"  {run['class']:<7} {mode:<8} {case.id}: {run.get('reason') or ''}"[:300], flush=True)

    results = run_suite(cases, modes, args.jobs, args.timeout, progress, args.passes)
    summary = summarize(results, modes)
    elapsed = time.perf_counter() - start
    print(format_summary(summary, modes, passes=args.passes))
    print(f"\n{len(cases)} cases in {elapsed:.0f} s with {args.jobs} jobs")
    if args.json:
        if os.path.dirname(args.json):
            os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"seconds": round(elapsed, 1), "jobs": args.jobs, "modes": list(modes),
                       "summary": summary, "cases": results}, f, indent=1, default=str)
    bad = any(cls in ("WRONG", "CRASH") for m in modes for cls, _, _ in summary["failures"][m])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
