"""The textual pipeline: parsing, printing back, shell safety and errors that name what is wrong."""

from __future__ import annotations

import subprocess

import pytest

from graphopt.errors import PipelineError
from graphopt.passes.pipeline import format_passes, parse_pipeline, resolve
from graphopt.plugins import load_registry
from tests import helpers


@pytest.fixture(scope="module")
def reg():
    return load_registry(autoload=False, modules=[helpers])


@pytest.mark.parametrize("text", [
    "fold",
    "fold,typed-options",
    "typed-options:ratio=0.25:round_to=8:enabled=false:criterion=l2:ignore=fc+conv1:label=a/b.c:limit=3.5",
    "typed-options:ignore=/layer1/conv/Conv+fc,fold",
])
def test_canonical_text_round_trips(text, reg):
    assert str(parse_pipeline(text)) == text
    passes = resolve(text, reg)
    # printing resolved passes and parsing that again gives the same passes with the same options
    again = resolve(format_passes(passes), reg)
    assert [(p.name, p.options) for p in again] == [(p.name, p.options) for p in passes]


def test_options_are_typed(reg):
    (p,) = resolve("typed-options:ratio=0.25:round_to=8:enabled=false:criterion=l2:ignore=fc+conv1:limit=none", reg)
    assert p.options == helpers.TypedOptions.Options(0.25, 8, False, "l2", ("fc", "conv1"), "x", None)
    assert repr(p) == "typed-options:ratio=0.25:round_to=8:enabled=false:criterion=l2:ignore=fc+conv1"


def test_alias_expands_and_prints_back(reg):
    passes = resolve("broken-fold", reg)
    assert [p.name for p in passes] == ["eliminate-identity", "fold-constants", "fold-bn", "eliminate-dead",
                                        "scale-weights"]
    assert str(parse_pipeline("broken-fold")) == "broken-fold"


def test_an_alias_option_goes_to_the_pass_that_has_it(reg):
    """int8:method=entropy:keep_first=true is calibrate:method=entropy and place-qdq:keep_first=true; int8-qat's
    learn_scales reaches qat. An option no pass of the alias has, or several have, is refused naming them."""
    passes = resolve("int8:method=entropy:keep_first=true", reg)
    assert format_passes(passes) == \
        "insert-observers,calibrate:method=entropy,latency-guard,place-qdq:keep_first=true"
    assert format_passes(resolve("int8-qat:learn_scales=true", reg)) == \
        "insert-observers:fold_bn=false,calibrate,qat:learn_scales=true"
    with pytest.raises(PipelineError, match=r"'exclude_nodes' belongs to several \(place-qdq, qat\)"):
        resolve("int8-both:exclude_nodes=x", _with_alias(reg, "int8-both", "place-qdq,qat"))


def _with_alias(reg, name, text):
    import copy

    other = copy.copy(reg)
    other.pipelines = {**reg.pipelines, name: type(next(iter(reg.pipelines.values())))(name, text, "", "test")}
    return other


@pytest.mark.parametrize("text, message", [
    ("", "empty pipeline"),
    ("fold,,fold", "empty pass name"),
    ("nope", "unknown pass 'nope'"),
    ("typed-options:ratio", "not key=value"),
    ("typed-options:ratio=abc", "option 'ratio' expects a number, got 'abc'"),
    ("typed-options:round_to=1.5", "expects an integer"),
    ("typed-options:enabled=maybe", "expects true or false"),
    ("typed-options:criterion=l3", "one of l1, l2"),
    ("typed-options:ratio=1.5", "ratio must be in [0, 1)"),
    ("typed-options:colour=red", "has no option 'colour'"),
    ("typed-options:ratio=0.1:ratio=0.2", "given twice"),
    ("fold:x=1", "its option 'x' belongs to none of its passes"),
    ("prune{ratio=0.5}", "characters the syntax does not use"),
    ("prune(ratio=0.5)", "characters the syntax does not use"),
    ("pruneratio=0.5", "shell split it by brace expansion"),
    ("fold prune", "characters the syntax does not use"),
])
def test_errors_name_the_problem(text, message, reg):
    with pytest.raises(PipelineError) as info:
        resolve(text, reg)
    assert message in str(info.value)


def test_syntax_survives_an_unquoted_shell():
    text = "fold,typed-options:ratio=0.25:ignore=/a/b.c+fc:limit=none"
    echoed = subprocess.run(["bash", "-c", f"printf '%s\\n' {text}"], capture_output=True, text=True, check=True)
    assert echoed.stdout.strip() == text


def test_brace_syntax_is_split_by_bash_and_refused():
    """What a user who types MLIR-style braces unquoted actually hands us, and that it is refused loudly."""
    words = subprocess.run(["bash", "-c", "printf '%s\\n' prune{ratio=0.5,round_to=8}"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert words == ["pruneratio=0.5", "pruneround_to=8"]
    with pytest.raises(PipelineError, match="brace expansion"):
        parse_pipeline(words[0])
