"""The README's own commands, run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def blocks(lang: str, section: str | None = None) -> list[str]:
    text = README
    if section:
        text = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_install_command_is_the_one_ci_runs():
    install = blocks("bash", "Set up")[0].splitlines()[0]
    assert install.startswith("pip install ")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    ci_args = re.search(r"^INSTALL=\((.*)\)$", ci, re.M).group(1)
    assert install == f"pip install {ci_args}"
    assert '"${INSTALL[@]}"' in ci.split("--report", 1)[1]  # the resolution CI keys its venv on is this command


def test_test_command_is_the_one_ci_runs():
    test_cmd = blocks("bash", "Set up")[1].strip()
    assert test_cmd in open(os.path.join(ROOT, ".ci", "run")).read()


def test_example_build_and_run_command(tmp_path):
    """The second set-up line, as written (the install line is what .ci/run executed to get here)."""
    command = blocks("bash", "Set up")[0].splitlines()[1]
    assert "graphopt run examples/tiny_resnet.onnx --passes fold" in command
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "folded 12 BatchNormalization" in proc.stdout
    assert "wrote examples/tiny_resnet.opt.onnx: 29 nodes" in proc.stdout
    # the README's sample output is what the command prints (timings and float error aside)
    shown = README.split("```\n$ graphopt run examples/tiny_resnet.onnx --passes fold\n", 1)[1].split("```", 1)[0]
    printed = [_stable(out) for out in proc.stdout.splitlines()]
    for line in shown.splitlines():
        if line.strip(" -"):  # (the rule under the header follows the columns' widths)
            assert _stable(line) in printed, line


def _stable(line: str) -> list[str]:
    """A report line's words without its timings and float errors."""
    return re.sub(r"rel\.err \S+|rel\. error \S+|\d+\.\d+ ms", "", line).split()


def _exec_in(folder, code: str) -> dict:
    """Run README code with ``folder`` as the working directory; its namespace afterwards."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        return namespace
    finally:
        os.chdir(cwd)


def test_python_api_example(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "build_example.py"), "-o",
                    str(tmp_path / "tiny_resnet.onnx")], check=True, capture_output=True)
    (tmp_path / "examples").mkdir()
    shutil.move(tmp_path / "tiny_resnet.onnx", tmp_path / "examples" / "tiny_resnet.onnx")
    namespace = _exec_in(tmp_path, blocks("python", "The Python API")[0])
    assert (tmp_path / "tiny_resnet.opt.onnx").exists()
    folded = namespace["folded"]
    assert not [m for m in folded.modules() if type(m).__name__.startswith("BatchNorm")]


def test_python_api_pruning_example(tmp_path):
    """The prune-then-fine-tune example, with the first example's imports."""
    code = "import graphopt, numpy as np, torch\nfrom graphopt import zoo\n" + blocks("python", "The Python API")[1]
    namespace = _exec_in(tmp_path, code)
    assert (tmp_path / "digits.pruned.pt2").exists()
    notes = namespace["pruned"].report.records[-1].notes
    assert any("fine-tuned by train()" in n for n in notes)


def test_python_api_distillation_example(tmp_path):
    """The distillation example: a pruned digits CNN trained back from the unpruned one."""
    code = ("import copy, graphopt, torch\nfrom graphopt import zoo\nmodel = zoo.train_digits_cnn(epochs=2)\n"
            "x_train, y_train, _, _ = zoo.digits_data(0)\n" + blocks("python", "The Python API")[2])
    namespace = _exec_in(tmp_path, code)
    notes = namespace["pruned"].report.records[-1].notes
    assert any("fine-tuned by" in n for n in notes), notes


def test_python_api_qat_example(tmp_path):
    """The QAT example: the pruned digits CNN through int8-qat on x86, written as an AOTInductor package whose
    kernels are int8."""
    code = ("import copy, graphopt, torch\nfrom graphopt import zoo\nmodel = zoo.train_digits_cnn(epochs=2)\n"
            "x_train, y_train, _, _ = zoo.digits_data(0)\n" + blocks("python", "The Python API")[2]
            + blocks("python", "The Python API")[3])
    namespace = _exec_in(tmp_path, code)
    assert (tmp_path / "digits.int8.pt2").exists()
    summary = " ".join(namespace["int8"].artifact["summary"])
    assert "int8" in summary, summary
