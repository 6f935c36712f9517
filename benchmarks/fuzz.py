"""A mutation fuzzer for graphopt's command line: no input may make graphopt end badly.

    python benchmarks/fuzz.py --count 1000 --seed 1 --jobs 2 [--keep DIR] [--timeout 60] [--exec]
                              [--index 3,17] [--seeds mlp,pt2] [--json out.json] [-v]

Seeds are small valid models built in code (``_fuzz_seeds.py``: ONNX conv+BatchNorm, MLP, external data,
Shape->Gather->Reshape, If, IR 3, custom domain, float16; a torch.export ``.pt2`` and a ``torch.save`` zip). Mutant
``i`` of ``--seed S`` is seed ``i mod 10`` with one to three edits (``_fuzz_mutate.py``: truncation, bit flips,
byte overwrites, ModelProto field edits, zip member corruption), drawn from the random stream ``S/i`` alone, so
``--index i`` rebuilds exactly that mutant. Each mutant, in a folder of its own, goes through

    graphopt run M --passes P -o OUT [--no-check]      P: fold, fold,int8, int8-dynamic, fp16, prune, sparsify
    graphopt inspect M
    graphopt verify M

each in a child process with a timeout and a 4 GB address-space limit. By default the child is forked from this
process, which has imported graphopt and its libraries once (a command then costs what graphopt does, not
Python's start-up); ``--exec`` runs a fresh ``python -m graphopt`` instead. Either way the child has its own
stdout/stderr files (C-level writes included), its own TMPDIR, and its exit status or signal is what is judged.

Every command must: exit 0 or 2-7 (70, "internal error", another code, a signal or a traceback is a failure; a
timeout is counted apart); leave stderr empty on exit 0 and exactly one ``graphopt: error:`` line otherwise;
leave every input file (the model and its external data) byte-identical; leave no file in the folder or TMPDIR
but the documented outputs (OUT and OUT.data on exit 0). Prints the counts by command and exit code, then each
failure with its mutant, command and last stderr line. A failing mutant of several edits is minimized (the fewest
of its edits that still fail the same way); ``--keep DIR`` saves it, with ``repro.sh``, under DIR. Also counted
(not failures): exit 5 where a pass raised a Python exception (``pass 'x': KeyError: ...``) and error lines that
do not end with a ``(what to do)``. Exit status: 1 when any command failed, else 0.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _fuzz_mutate as fm  # noqa: E402
import _fuzz_seeds as fs  # noqa: E402

PIPELINES = ["fold", "fold,int8", "int8-dynamic", "fp16", "prune", "sparsify"]
DOCUMENTED = {0, 2, 3, 4, 5, 6, 7}
MEMORY_LIMIT = 4 * 2**30
PASS_CRASH = re.compile(r"pass '[^']+': (?:[A-Za-z_.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b")
TORCH_CACHES = ("torchinductor_",)  # torch's own per-user cache folder, made when torch.export.load imports inductor
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- what a mutant runs -----------------------------------------------------------------------------------------
@dataclass
class Command:
    argv: list[str]  # graphopt's arguments, paths relative to the mutant's folder
    outputs: tuple[str, ...] = ()  # the files it may leave on exit 0

    def text(self) -> str:
        return "graphopt " + " ".join(_quote(a) for a in self.argv)


@dataclass
class Case:
    index: int
    mutant: fm.Mutant
    commands: list[Command]
    folder: str = ""
    results: list[dict] = field(default_factory=list)
    seed: int = 0  # the --seed it came from (mutant `seed:index`)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w.,:=+/@-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def commands_for(seed: fs.Seed, index: int, rng_seed: str) -> list[Command]:
    import random

    rng = random.Random(f"{rng_seed}/commands")
    out = "out.onnx" if seed.kind == "onnx" else "out.pt2"
    passes = PIPELINES[(index // len(SEED_NAMES)) % len(PIPELINES)]
    run = ["run", seed.main, "--passes", passes, "-o", out] + (["--no-check"] if rng.random() < 0.25 else [])
    return [Command(run, (out, out + ".data")), Command(["inspect", seed.main]), Command(["verify", seed.main])]


SEED_NAMES = ["conv_bn", "mlp", "external", "shape_chain", "if", "ir3", "custom_domain", "float16", "pt2",
              "torch_save"]


def make_case(seeds: dict[str, fs.Seed], index: int, seed: int) -> Case:
    chosen = seeds[SEED_NAMES[index % len(SEED_NAMES)]]
    stream = f"{seed}/{index}"
    return Case(index, fm.mutate(chosen, stream), commands_for(chosen, index, stream), seed=seed)


# -- running one command in a child -----------------------------------------------------------------------------
class Child:
    """One graphopt command in a child process: forked from this (pre-imported) process, or a fresh
    ``python -m graphopt`` with ``exec_mode``."""

    def __init__(self, argv: list[str], cwd: str, tmpdir: str, log: str, exec_mode: bool):
        self.stdout, self.stderr = log + ".out", log + ".err"
        self.started = time.monotonic()
        if exec_mode:
            with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
                env = {**os.environ, "TMPDIR": tmpdir}
                self.popen = subprocess.Popen([sys.executable, "-m", "graphopt", *argv], cwd=cwd, stdout=out,
                                              stderr=err, stdin=subprocess.DEVNULL, env=env,
                                              preexec_fn=_limit_memory)
            self.pid = self.popen.pid
            return
        self.popen = None
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            _child_main(argv, cwd, tmpdir, self.stdout, self.stderr)

    def poll(self) -> int | None:
        """The exit status (negative: the signal) once the child has ended, else None."""
        if self.popen is not None:
            return self.popen.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.popen is not None:
            self.popen.wait()
        else:
            os.waitpid(self.pid, 0)


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _child_main(argv, cwd, tmpdir, stdout, stderr) -> None:
    """In the forked child: what ``python -m graphopt ARGV`` would do, then exit without running the parent's
    cleanup."""
    rc = 1
    try:
        for fd, path in ((1, stdout), (2, stderr)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        _limit_memory()
        os.chdir(cwd)
        os.environ["TMPDIR"] = tmpdir
        tempfile.tempdir = None
        sys.argv = ["graphopt", *argv]
        from graphopt.cli import main

        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's --help / --version
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what would escape `python -m graphopt`: the interpreter prints the traceback
            import traceback

            traceback.print_exc()
            rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)


# -- judging one command ----------------------------------------------------------------------------------------
def snapshot(folder: str) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            try:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                out[rel] = "unreadable"
    return out


def judge(cmd: Command, status: int | None, stdout: str, stderr: str, before: dict, after: dict,
          tmp_left: list[str]) -> dict:
    """The verdict on one command: ``{"status", "failure" (None or its class), "why", "info": [...]}``."""
    lines = [s for s in stderr.splitlines() if s.strip()]
    last = lines[-1][:300] if lines else ""
    verdict = {"status": status, "failure": None, "why": "", "info": [], "stderr": last}

    def fail(kind: str, why: str) -> dict:
        verdict.update(failure=kind, why=why)
        return verdict

    if status is None:
        return fail("timeout", "timed out")
    if status < 0:
        return fail("signal", f"killed by signal {-status} ({signal.Signals(-status).name})")
    if status == 70 or "graphopt: internal error" in stderr:
        return fail("internal error", last)
    if "Traceback (most recent call last)" in stderr + stdout:
        return fail("traceback", last)
    if status not in DOCUMENTED:
        return fail("exit code", f"exit {status}: {last}")
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    if changed:
        return fail("input changed", f"changed or removed: {', '.join(changed)}")
    allowed = set(cmd.outputs) if status == 0 else set()
    extra = sorted(set(after) - set(before) - allowed)
    if extra or tmp_left:
        return fail("leftover", f"left behind: {', '.join(extra + ['TMPDIR/' + t for t in tmp_left])}")
    if status == 0 and lines:
        return fail("stderr", f"exit 0 with stderr: {last}")
    if status != 0 and (len(lines) != 1 or not lines[0].startswith("graphopt: error: ")):
        return fail("stderr", f"exit {status} with {len(lines)} stderr lines: {last}")
    if status == 0 and cmd.outputs and os.path.basename(cmd.outputs[0]) not in after:
        return fail("no output", "exit 0 but nothing written")
    if status == 5 and PASS_CRASH.search(last):
        verdict["info"].append("pass raised")
    if status != 0 and not lines[-1].rstrip().endswith(")"):  # the whole line: `last` is cut at 300
        verdict["info"].append("no what-to-do")
    return verdict


# -- the loop ---------------------------------------------------------------------------------------------------
class Fuzzer:
    def __init__(self, seeds: dict[str, fs.Seed], workdir: str, jobs: int, timeout: float, exec_mode: bool):
        self.seeds, self.workdir, self.jobs, self.timeout, self.exec_mode = seeds, workdir, jobs, timeout, exec_mode

    def run(self, cases: list[Case], progress=None) -> None:
        """Every command of every case, ``jobs`` cases at a time (a case's commands in order)."""
        pending = list(reversed(cases))
        active: dict[int, tuple[Case, int, Child, dict, str]] = {}  # slot -> (case, command, child, before, tmp)
        while pending or active:
            for slot in range(self.jobs):
                if slot not in active and pending:
                    case = pending.pop()
                    self._lay_out(case)
                    active[slot] = self._start(case, 0, slot)
            time.sleep(0.01)
            for slot, (case, k, child, before, tmp) in list(active.items()):
                status = child.poll()
                if status is None and time.monotonic() - child.started < self.timeout:
                    continue
                if status is None:
                    child.kill()
                case.results.append(self._finish(case.commands[k], status, child, before, case.folder, tmp))
                if k + 1 < len(case.commands):
                    active[slot] = self._start(case, k + 1, slot)
                else:
                    del active[slot]
                    if progress:
                        progress(case)

    def _lay_out(self, case: Case) -> None:
        case.folder = os.path.join(self.workdir, f"m{case.seed}-{case.index:05d}")
        shutil.rmtree(case.folder, ignore_errors=True)
        os.makedirs(case.folder)
        for name, data in case.mutant.files.items():
            with open(os.path.join(case.folder, name), "wb") as f:
                f.write(data)

    def _start(self, case: Case, k: int, slot: int):
        tmp = os.path.join(self.workdir, f"tmp-{slot}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        before = snapshot(case.folder)
        log = os.path.join(self.workdir, f"log-{slot}")
        return case, k, Child(case.commands[k].argv, case.folder, tmp, log, self.exec_mode), before, tmp

    def _finish(self, cmd: Command, status, child: Child, before: dict, folder: str, tmp: str) -> dict:
        stdout, stderr = (_read(p) for p in (child.stdout, child.stderr))
        after = snapshot(folder)
        tmp_left = sorted(n for n in os.listdir(tmp) if not n.startswith(TORCH_CACHES)) if os.path.isdir(tmp) else []
        verdict = judge(cmd, status, stdout, stderr, before, after, tmp_left)
        verdict["seconds"] = round(time.monotonic() - child.started, 2)
        for name in set(after) - set(before):  # the next command sees the folder as it was
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        return verdict

    def rerun(self, seed: fs.Seed, streams: list[str], cmd: Command, index: int) -> tuple[fm.Mutant, dict]:
        """One command on the mutant that ``streams`` rebuild (for minimizing)."""
        case = Case(index, fm.replay(seed, streams), [cmd], seed=-1)
        self.run([case])
        shutil.rmtree(case.folder, ignore_errors=True)
        return case.mutant, case.results[0]


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def minimize(fuzzer: Fuzzer, case: Case, k: int) -> tuple[fm.Mutant, dict]:
    """The fewest of ``case``'s edits whose mutant still fails command ``k`` the same way."""
    streams, verdict = case.mutant.streams, case.results[k]
    seed = case.mutant.seed
    for size in range(1, len(streams)):
        for subset in itertools.combinations(streams, size):
            mutant, again = fuzzer.rerun(seed, list(subset), case.commands[k], case.index)
            if again["failure"] == verdict["failure"]:
                return mutant, again
    return case.mutant, verdict


def keep(folder: str, case: Case, mutant: fm.Mutant, k: int, verdict: dict) -> str:
    where = os.path.join(folder, f"m{case.seed}-{case.index:05d}-{mutant.seed.name}-{k}")
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(where)
    for name, data in mutant.files.items():
        with open(os.path.join(where, name), "wb") as f:
            f.write(data)
    with open(os.path.join(where, "repro.sh"), "w") as f:
        f.write(f"# {verdict['failure']}: {verdict['why']}\n# edits: {'; '.join(mutant.edits)}\n"
                f'cd "$(dirname "$0")" && {case.commands[k].text()}\n')
    return where


# -- seeds, built once in a child (torch.export must not run threads in the process that forks) -----------------
def build_seeds(names: list[str]) -> dict[str, fs.Seed]:
    with_torch = bool({"pt2", "torch_save"} & set(names))
    fd, path = tempfile.mkstemp(prefix="graphopt-fuzz-seeds-")
    os.close(fd)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with open(path, "wb") as f:
                    pickle.dump(fs.all_seeds(with_torch), f)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit("fuzz: building the seeds failed")
        with open(path, "rb") as f:
            seeds = pickle.load(f)
    finally:
        os.unlink(path)
    return {s.name: s for s in seeds if s.name in names}


def preload() -> None:
    """Import what graphopt's commands import, and load the plugins once, before forking children."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnx_graphsurgeon  # noqa: F401
        import onnxruntime  # noqa: F401
        import torch  # noqa: F401
        import torch.export  # noqa: F401
        import torch.fx  # noqa: F401

        import graphopt.cli  # noqa: F401
        import graphopt.driver  # noqa: F401
        from graphopt.plugins import load_registry

        load_registry()


# -- the report -------------------------------------------------------------------------------------------------
def summarize(cases: list[Case]) -> dict:
    by_exit: dict[str, Counter] = defaultdict(Counter)
    failures, info = [], Counter()
    for case in cases:
        for k, (cmd, v) in enumerate(zip(case.commands, case.results)):
            key = "timeout" if v["status"] is None else str(v["status"])
            by_exit[cmd.argv[0]][key] += 1
            for item in v["info"]:
                info[item] += 1
            if v["failure"]:
                failures.append((case, k, v))
    return {"by_exit": by_exit, "failures": failures, "info": info}


def format_counts(by_exit: dict[str, Counter]) -> str:
    codes = sorted({c for counts in by_exit.values() for c in counts}, key=lambda c: (c == "timeout", int(c)
                                                                                       if c != "timeout" else 0))
    commands = [c for c in ("run", "inspect", "verify") if c in by_exit]
    rows = [["exit", *commands, "all"]]
    for code in codes:
        rows.append([code, *(str(by_exit[c][code]) for c in commands), str(sum(by_exit[c][code] for c in commands))])
    rows.append(["all", *(str(sum(by_exit[c].values())) for c in commands),
                 str(sum(sum(by_exit[c].values()) for c in commands))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=100, help="mutants to run (default 100)")
    p.add_argument("--seed", type=int, default=0, help="the random seed (mutant i of seed S is always the same)")
    p.add_argument("--start", type=int, default=0, help="the first mutant index (default 0)")
    p.add_argument("--index", help="only these mutant indices, comma-separated (rebuilds them exactly)")
    p.add_argument("--seeds", help=f"only mutants of these seeds, comma-separated ({', '.join(SEED_NAMES)})")
    p.add_argument("--jobs", type=int, default=2, help="commands run at once (default 2)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per command (default 60)")
    p.add_argument("--exec", dest="exec_mode", action="store_true",
                   help="run each command as a fresh `python -m graphopt` (slower) instead of a forked child")
    p.add_argument("--keep", metavar="DIR", help="save each failing (minimized) mutant and its repro.sh here")
    p.add_argument("--no-minimize", action="store_true", help="report failing mutants as they are")
    p.add_argument("--json", metavar="PATH", help="write every command's verdict as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print every mutant as it finishes")
    args = p.parse_args(argv)

    names = args.seeds.split(",") if args.seeds else SEED_NAMES
    unknown = set(names) - set(SEED_NAMES)
    if unknown:
        p.error(f"unknown seeds: {', '.join(sorted(unknown))}")
    start_time = time.perf_counter()
    seeds = build_seeds(names)
    if not args.exec_mode:
        preload()
    if args.index:  # "i" (of --seed) or "S:i"
        indices = [(int(i.split(":")[0]), int(i.split(":")[1])) if ":" in i else (args.seed, int(i))
                   for i in args.index.split(",") if i]
    else:
        indices = [(args.seed, i) for i in range(args.start, args.start + 10**7)
                   if SEED_NAMES[i % len(SEED_NAMES)] in names][: args.count]
    cases = [make_case(seeds, i, s) for s, i in indices]
    print(f"fuzz: {len(cases)} mutants of seed {args.seed}, {len(seeds)} seeds, {args.jobs} jobs, "
          f"{'exec' if args.exec_mode else 'fork'} mode", flush=True)
    done = [0]

    def progress(case: Case) -> None:
        done[0] += 1
        bad = [v for v in case.results if v["failure"]]
        if args.verbose or bad:
            codes = " ".join(str(v["status"]) for v in case.results)
            print(f"  #{case.seed}:{case.index} {case.mutant.seed.name} [{codes}] {'; '.join(case.mutant.edits)[:150]}"
                  + "".join(f"\n      {v['failure'].upper()}: {v['why'][:250]}" for v in bad), flush=True)
        if done[0] % 100 == 0:
            print(f"  ... {done[0]} mutants, {time.perf_counter() - start_time:.0f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="graphopt-fuzz-") as workdir:
        fuzzer = Fuzzer(seeds, workdir, args.jobs, args.timeout, args.exec_mode)
        fuzzer.run(cases, progress)
        summary = summarize(cases)
        reports = []
        for case, k, verdict in summary["failures"]:
            mutant = case.mutant
            if not args.no_minimize and len(mutant.streams) > 1 and verdict["failure"] != "timeout":
                mutant, verdict = minimize(fuzzer, case, k)
            kept = keep(args.keep, case, mutant, k, verdict) if args.keep else None
            reports.append((case, k, mutant, verdict, kept))
    elapsed = time.perf_counter() - start_time

    print(f"\nexit codes ({len(cases)} mutants, {sum(len(c.results) for c in cases)} commands, {elapsed:.0f} s):")
    print(format_counts(summary["by_exit"]))
    kinds = Counter(v["failure"] for _, _, _, v, _ in reports)
    timeouts = kinds.pop("timeout", 0)
    print(f"\nfailures: {sum(kinds.values())}" + (f" ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})"
                                               if kinds else "") + f"; timeouts: {timeouts}")
    for what, n in sorted(summary["info"].items()):
        print(f"noted (not failures): {n} x {what}")
    for case, k, mutant, verdict, kept in reports:
        cmd = case.commands[k]
        print(f"\n{verdict['failure'].upper()} #{case.seed}:{case.index} ({mutant.seed.name}: "
              f"{'; '.join(mutant.edits)})\n  {cmd.text()}\n  -> {verdict['why']}"
              + (f"\n  repro: sh {kept}/repro.sh" if kept else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "seconds": round(elapsed, 1), "cases": [
                {"index": f"{c.seed}:{c.index}", "seed": c.mutant.seed.name, "edits": c.mutant.edits,
                 "commands": [{"argv": cmd.argv, **v} for cmd, v in zip(c.commands, c.results)]} for c in cases]},
                f, indent=1)
    return 1 if kinds else 0


if __name__ == "__main__":
    sys.exit(main())
