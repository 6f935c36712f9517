"""Every class of bad input ends in one ``graphopt: error:`` line with README's exit code (2 usage, 3 unreadable
input, 4 unsupported, 5 pass failure, 6 equivalence failure, 7 I/O), every input byte-identical and nothing left
behind; and 30 fixed mutants of ``benchmarks/fuzz.py`` as a fast regression test of the fuzzer's findings.

Where each class of the issue is tested (this file adds a case only where none existed, and the exit code where
a test asserted only "non-zero"); "here" is this file:

- ops in an unknown domain: here (verify 4; run 0, the warning on stdout, stderr empty);
  test_onnx_io::test_custom_domain_loads_verifies_and_saves_untouched; test_custom_domain.py (the passes)
- an opset newer than onnxruntime: here (com.microsoft 99: verify 4; run 0, "not compared")
- an opset / IR version newer than onnx knows: test_onnx_io::test_opset_newer_than_onnx_knows_is_one_unsupported_line
- -o into a read-only folder (simulated: tests run as root):
  test_outputs::test_a_folder_that_refuses_writes_is_an_io_error,
  test_onnx_io::test_write_failures_are_output_errors_and_leave_nothing
- -o onto a directory, --json into a missing folder: test_outputs::test_bad_targets_are_io_errors_before_any_pass
- a failed --eval before the passes: test_outputs::test_failed_eval_leaves_no_output,
  test_cli_int8::test_bad_calibration_or_evaluation_data_is_one_line
- a failed --eval or --json after the passes (out.onnx was left behind): here
- -p missing_module, -p module_that_raises: test_outputs::test_a_named_plugin_that_does_not_load_is_an_error
- truncated file, empty file, a directory as the model, an invalid graph (a dangling node input), not ONNX, bad
  pipeline syntax (unknown pass, unknown option, wrong type), a pass on the wrong IR, output over input, a bad
  flag: test_cli::test_bad_input_gives_one_line_and_nonzero_exit; their exit codes here
- braces in the pipeline: here (CLI); test_pipeline::test_brace_syntax_is_split_by_bash_and_refused (parser)
- bit-flipped protobuf: here (unparseable: 3; a flip into ir_version: 4)
- tensor data that does not fill its shape, a string field that is not UTF-8, a value with an empty or opaque type,
  a graph without outputs, a graph only the full check rejects, pruning a model that never ran: here (found by
  the fuzzer)
- external data outside the folder / through a link / past the end:
  test_onnx_io::test_unsafe_external_data_is_refused_before_anything_reads_it
- a pickle with __reduce__: test_torch_loading::test_a_pickle_that_runs_code_is_refused_without_running
- a state dict: test_torch_loading::test_files_that_hold_no_program_say_so
- an AOTInductor-like zip: test_torch_loading::test_an_aotinductor_package_is_compiled_code
- a .pt2 that is junk, empty or truncated: test_torch_loading::test_damaged_files_get_one_line_and_stay_as_they_were
- NaN calibration data, calibration data of the wrong shape: here (CLI); test_nonfinite.py,
  test_calib_sources::test_mismatches_are_one_line_errors_naming_the_input (API)
- a float16 model through int8: here (CLI); test_quant_preconditions.py (API)
- a pass that breaks equivalence: test_cli::test_numeric_check_stops_a_pass_that_lies_about_being_exact (6)
- a pass that raises: test_cli::test_reproducer_saves_the_failing_input (5)
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from tests.test_cli import BAD_INPUTS
from tests.test_outputs import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _fuzz_seeds as seeds  # noqa: E402

HINT = re.compile(r" \([^()]*(\([^()]*\)[^()]*)*\)$")  # the message ends with "(what to do)"


def refused(capfd, argv, code, *fragments, folder, hint=True) -> str:
    """Run ``graphopt ARGV`` in-process: exit ``code``, one ``graphopt: error:`` line on stderr (C-level writes
    included) holding every fragment, no traceback, and ``folder``'s files byte-identical, nothing added."""
    before = snapshot(folder)
    listing = sorted(os.listdir(folder))
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert rc == code, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if hint:
        assert HINT.search(lines[0]), f"no (what to do) at the end: {lines[0]}"
    assert sorted(os.listdir(folder)) == listing and snapshot(folder) == before
    return lines[0]


def write(path, model: onnx.ModelProto):
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def mlp(tmp_path):
    return write(tmp_path / "model.onnx", seeds.mlp())


def _one_op(domain: str, version: int, op: str) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid(domain, version)])


# -- the exit codes of test_cli's cases --------------------------------------------------------------------------
EXIT_CODES = {"missing file": 3, "not onnx": 3, "truncated": 3, "empty": 3, "invalid graph": 3, "directory": 3,
              "unknown pass": 2, "malformed option": 2, "unknown option": 2, "wrong IR": 4, "output over input": 2,
              "bad flag": 2, "negative rtol": 2}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_test_clis_bad_inputs_exit_with_readmes_code(case, mlp, tmp_path, capfd):
    make, extra, message = BAD_INPUTS[case]
    path = make(tmp_path, mlp)
    extra = [str(path) if a == "SELF" else a for a in extra]
    refused(capfd, ["run", path, *extra], EXIT_CODES[case], message, folder=tmp_path, hint=False)


# -- versions and domains onnxruntime does not have ---------------------------------------------------------------
@pytest.mark.parametrize("domain, version, op, code, phrase", [
    ("com.example", 1, "Zap", 4, "com.example:Zap(-1) is not a registered function/op"),
    ("com.microsoft", 99, "Gelu", 4, "com.microsoft opset 99 is newer than onnxruntime"),
])
def test_what_onnxruntime_cannot_run_is_unsupported_and_run_says_not_compared(domain, version, op, code, phrase,
                                                                            tmp_path, capfd):
    path = write(tmp_path / "m.onnx", _one_op(domain, version, op))
    refused(capfd, ["verify", path], code, phrase, folder=tmp_path)
    assert main(["run", str(path), "-o", str(tmp_path / "out.onnx")]) == 0
    out, err = capfd.readouterr()
    assert err == ""  # the warning is printed once, on stdout (it was also on stderr, through logging)
    assert "warning: numeric check: not compared" in out and phrase in out
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]


# -- failures after the passes leave nothing behind --------------------------------------------------------------
def test_eval_data_that_does_not_fit_fails_before_the_output_lands(mlp, tmp_path, capfd):
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 7), np.float32), labels=np.zeros(4, np.int64))
    refused(capfd, ["run", mlp, "--eval", tmp_path / "eval.npz", "-o", tmp_path / "out.onnx"], 2,
            f"--eval {tmp_path / 'eval.npz'}: data: input 'x' has shape (4, 7)", folder=tmp_path)


def test_a_json_report_that_cannot_be_written_takes_the_model_with_it(tmp_path, capfd, monkeypatch):
    path = tmp_path / "model.onnx"
    onnx.save_model(seeds.mlp(), str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    report = tmp_path / "report.json"
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # the disk fills up just as the report is moved into place
        if os.fspath(dst) == str(report):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    refused(capfd, ["run", path, "-o", tmp_path / "out.onnx", "--json", report], 7, "--json", "No space left",
            folder=tmp_path, hint=False)


# -- damaged ONNX files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("byte, bit, code, phrase", [
    (20, 1, 3, "not a readable ONNX model"),  # the protobuf no longer parses
    (1, 7, 4, "IR version 2312 is newer than onnx"),  # ir_version's varint runs into the next byte
])
def test_bit_flipped_protobuf(byte, bit, code, phrase, tmp_path, capfd):
    data = bytearray(seeds.mlp().SerializeToString())
    data[byte] ^= 1 << bit
    (tmp_path / "m.onnx").write_bytes(bytes(data))
    for command in ("run", "inspect", "verify"):
        refused(capfd, [command, tmp_path / "m.onnx"], code, phrase, folder=tmp_path)


@pytest.mark.parametrize("edit, phrase", [
    (lambda t: setattr(t, "raw_data", t.raw_data + b"\0" * 4), "holds 2052 bytes, but a [16, 32]"),
    (lambda t: setattr(t, "raw_data", t.raw_data[:100]), "holds 100 bytes, but a [16, 32]"),
    (lambda t: (t.ClearField("raw_data"), t.float_data.extend([1.0] * 3)), "holds 3 values in float_data"),
])
def test_tensor_data_that_does_not_fill_its_shape_is_unreadable(edit, phrase, tmp_path, capfd):
    model = seeds.mlp()
    edit(next(t for t in model.graph.initializer if t.name == "W1"))
    path = write(tmp_path / "m.onnx", model)
    for command in ("run", "inspect"):
        refused(capfd, [command, path], 3, "tensor 'W1'", phrase, folder=tmp_path)


def _type_error(modified: bool) -> onnx.ModelProto:
    """MatMul of a float input by a uint8 weight: the plain checker passes it, the full check (types) does not.
    With ``modified``, an Identity before it gives eliminate-identity something to change."""
    w = numpy_helper.from_array(np.ones((4, 3), np.uint8), "W")
    nodes = [helper.make_node("Identity", ["x"], ["xi"])] if modified else []
    nodes.append(helper.make_node("MatMul", ["xi" if modified else "x", "W"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("modified", [False, True])
def test_a_graph_only_the_full_check_rejects_is_the_inputs_fault(modified, tmp_path, capfd):
    """It used to be exit 5, 'pass eliminate-identity: the result is not a valid model' (or 'pass load')."""
    path = write(tmp_path / "m.onnx", _type_error(modified))
    refused(capfd, ["run", path, "-o", tmp_path / "out.onnx"], 3, f"{path}: invalid ONNX graph",
            "has unsupported type: tensor(uint8)", folder=tmp_path)
    refused(capfd, ["verify", path], 3, "invalid", "tensor(uint8)", folder=tmp_path, hint=False)


def test_a_string_field_that_is_not_utf8_is_unreadable(tmp_path, capfd):
    """Found by the fuzzer (bytes inserted into producer_name): it loaded, and failed when the result was written
    with 'cannot write: 'utf-8' codec can't decode ... (the graph alone is over 2 GB)', exit 7."""
    data = seeds.mlp().SerializeToString()
    at = data.index(b"graphopt-fuzz")
    data = data[:at] + b"\xfa\x35\x80" + data[at + 3:]  # same length: only the text is broken
    (tmp_path / "m.onnx").write_bytes(data)
    for command in ("run", "inspect"):
        refused(capfd, [command, tmp_path / "m.onnx", "-o", tmp_path / "out.onnx"][:2 if command == "inspect" else 4],
                3, "producer_name is not UTF-8 text", folder=tmp_path)


def test_pruning_a_model_that_never_ran_does_not_blame_a_channel_handler(tmp_path, capfd):
    """Found by the fuzzer: a Gemm bias of the wrong length passes onnx's full check but not onnxruntime."""
    model = seeds.conv_bn()
    bias = next(t for t in model.graph.initializer if t.name == "C")
    bias.CopyFrom(numpy_helper.from_array(np.zeros(3, np.float32), "C"))
    path = write(tmp_path / "m.onnx", model)
    message = refused(capfd, ["run", path, "--passes", "prune", "-o", tmp_path / "out.onnx", "--no-check"], 5,
                      "pass 'prune-channels': the model does not run on onnxruntime even before pruning",
                      "Invalid bias shape", folder=tmp_path)
    assert "bug in a channel handler" not in message


@pytest.mark.parametrize("kind, code, phrase", [("empty", 3, "has a type with nothing in it"),
                                               ("opaque", 4, "has an opaque type")])
def test_a_subgraph_value_without_a_usable_type(kind, code, phrase, tmp_path, capfd):
    """Found by the fuzzer (two bit flips emptied an If branch's output type, mutant 5:724): onnx-graphsurgeon
    imported it and failed to export it, 'TypeError: unhashable type: 'Opaque'', an internal error."""
    model = seeds.with_if()
    branch = next(a.g for a in model.graph.node[2].attribute if a.name == "else_branch")
    branch.output[0].type.Clear()
    if kind == "opaque":
        branch.output[0].type.opaque_type.name = "blob"
    path = write(tmp_path / "m.onnx", model)
    for command in ("run", "verify"):
        refused(capfd, [command, path], code, "value 'e' of graph 'else'", phrase, folder=tmp_path)


def test_a_graph_without_outputs_is_unreadable(tmp_path, capfd):
    model = seeds.mlp()
    del model.graph.output[:]
    path = write(tmp_path / "m.onnx", model)
    for command in ("run", "verify"):
        refused(capfd, [command, path], 3, "the graph has no outputs", folder=tmp_path)


# -- calibration data, pipelines, precisions ------------------------------------------------------------------
@pytest.mark.parametrize("data, phrase", [
    (np.full((4, 3, 8, 8), np.nan, np.float32), "input 'x' has 192 non-finite values (NaN/inf) in sample 0"),
    (np.zeros((4, 3, 9, 9), np.float32), "input 'x' has samples of shape (3, 9, 9), the model expects (3, 8, 8)"),
])
def test_bad_calibration_data_through_the_command_line(data, phrase, tmp_path, capfd):
    path = write(tmp_path / "m.onnx", seeds.conv_bn())
    np.savez(tmp_path / "calib.npz", x=data)
    refused(capfd, ["run", path, "--passes", "fold,int8", "--calib", tmp_path / "calib.npz", "-o",
                    tmp_path / "out.onnx"], 3, "calib.npz", phrase, folder=tmp_path, hint=False)


def test_braces_in_the_pipeline_say_how_to_write_options(mlp, tmp_path, capfd):
    refused(capfd, ["run", mlp, "--passes", "prune{ratio=0.5}"], 2, "('{' '}')", "prune:ratio=0.5",
            folder=tmp_path, hint=False)


@pytest.mark.parametrize("passes, phrase", [("int8", "pass 'place-qdq': the model computes in float16"),
                                            ("int8-dynamic", "computes in float16 (weight 'W')")])
def test_a_float16_model_through_int8_is_unsupported(passes, phrase, tmp_path, capfd):
    path = write(tmp_path / "m.onnx", seeds.float16())
    refused(capfd, ["run", path, "--passes", passes, "-o", tmp_path / "out.onnx"], 4, phrase, folder=tmp_path,
            hint=False)


# -- the fuzzer's findings, as fixed mutants ----------------------------------------------------------------------
# mutants (seed:index of benchmarks/fuzz.py) that failed before the fixes, then others to fill 30 across the seeds
FIXED_MUTANTS = {  # seed:index -> what it found (the run of each is the first, inspect and verify follow)
    "4:103": "value 'x' elem_type -> 19",  # internal error: a float8 input broke the numeric check's inputs
    "4:761": "value 'x' elem_type -> 20",  # the same, FLOAT8E5M2FNUZ
    "4:307": "inserted at 10",  # producer_name not UTF-8: exit 7 'the graph alone is over 2 GB'
    "4:940": "initializer 'C' replaced by a [0]",  # prune on a model that never ran: 'a bug in a channel handler'
    "4:582": "", "4:14": "", "4:31": "", "4:57": "",  # tensor data that does not fill its shape (was exit 5)
    "4:20": "", "4:62": "", "4:91": "", "4:94": "",  # invalid under the full check only (was exit 5 on a pass)
    "4:30": "", "4:365": "",  # a graph without outputs (was exit 0)
    "4:126": "", "4:36": "", "4:12": "", "4:25": "", "4:81": "", "4:134": "",  # exit 0 with a warning: stderr empty
    "4:72": "", "4:172": "",  # unsafe or broken external data
    "4:368": "", "4:118": "",  # .pt2 programs and a torch.save zip, damaged or not
    "6:88": "sample_inputs/model.pt replaced by",  # torch's pickle-protocol warning on stderr before the error
    "6:228": "byteorder truncated to 1 bytes",  # exit 0 with torch's LeafSpec FutureWarning (FX graph deepcopy)
    "5:724": "bits flipped at [285, 135]",  # internal error: an empty type in an If branch ('Opaque')
    "4:310": "", "4:553": "", "4:911": "",  # passes on models onnxruntime cannot run
}


def test_fixed_mutants_end_well():
    """``benchmarks/fuzz.py --index ...``: each mutant's run / inspect / verify exits 0 or 2-7 with one error line,
    leaves its inputs as they were and nothing behind (the fuzzer's own judgement). The edits named above must
    still be what these indices make: a change to the mutation code that moves them fails here, not silently."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fuzz.py"), "--index",
                           ",".join(FIXED_MUTANTS), "--jobs", "2", "--timeout", "120", "--no-minimize", "-v"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and "failures: 0;" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "timeouts: 0" in proc.stdout and f"({len(FIXED_MUTANTS)} mutants, " in proc.stdout
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^  #(\d+:\d+) .*$", proc.stdout, re.M)}
    for index, edit in FIXED_MUTANTS.items():
        assert edit in lines[index], (index, edit, lines.get(index))
    assert len(FIXED_MUTANTS) == 30
