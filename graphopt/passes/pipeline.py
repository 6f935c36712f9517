"""The textual pipeline: ``fold,prune:ratio=0.5:round_to=8,int8``.

Passes are separated by ``,``; each may carry ``:key=value`` options; list values join items with ``+``.
Every character in this syntax passes through an unquoted POSIX shell untouched. Brackets, braces and
parentheses are refused with a message saying how to write the options instead (``prune{ratio=0.5,x=1}``
unquoted is split by bash's brace expansion; ``prune(ratio=0.5)`` is a shell syntax error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from graphopt.errors import PipelineError
from graphopt.passes.options import format_options, parse_options

_ALLOWED = re.compile(r"^[A-Za-z0-9_.,:=+\-/@]*$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9\-]*$")


@dataclass(frozen=True)
class PassSpec:
    """One element of a pipeline as written: a pass or alias name and its raw options."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.options)])


@dataclass(frozen=True)
class Pipeline:
    specs: tuple[PassSpec, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.specs)


def parse_pipeline(text: str) -> Pipeline:
    text = text.strip()
    if not text:
        raise PipelineError("empty pipeline: give passes like --passes fold")
    bad = sorted({c for c in text if not _ALLOWED.match(c)})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise PipelineError(
            f"pipeline '{text}' has characters the syntax does not use ({shown}); write options as "
            f"pass:key=value:key2=value2 and lists as a+b, e.g. prune:ratio=0.5:round_to=8"
        )
    specs = []
    for element in text.split(","):
        name, *opts = element.split(":")
        if not name:
            raise PipelineError(f"pipeline '{text}': empty pass name (doubled or trailing ',' or ':'?)")
        if "=" in name:
            raise PipelineError(
                f"'{name}' is not a pass name: options follow the pass after ':' (prune:ratio=0.5); if you typed "
                f"prune{{ratio=0.5,x=1}} unquoted, the shell split it by brace expansion"
            )
        if not _NAME.match(name):
            raise PipelineError(f"'{name}' is not a valid pass name (letters, digits and '-')")
        items: list[tuple[str, str]] = []
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq or not key:
                raise PipelineError(f"pass '{name}': option '{opt}' is not key=value")
            if key in dict(items):
                raise PipelineError(f"pass '{name}': option '{key}' given twice")
            items.append((key, value))
        specs.append(PassSpec(name, tuple(items)))
    return Pipeline(tuple(specs))


def resolve(pipeline: Pipeline | str, registry, _seen: tuple[str, ...] = ()) -> list:
    """Expand aliases and build each pass with its typed options."""
    if isinstance(pipeline, str):
        pipeline = parse_pipeline(pipeline)
    passes = []
    for spec in pipeline.specs:
        if spec.name in registry.pipelines:
            alias = registry.pipelines[spec.name]
            if spec.name in _seen:
                raise PipelineError(f"pipeline alias '{spec.name}' refers to itself ({' -> '.join(_seen)})")
            inner = parse_pipeline(alias.text)
            if spec.options:
                inner = _route_options(spec, alias.text, inner, registry)
            passes += resolve(inner, registry, (*_seen, spec.name))
            continue
        cls = registry.pass_class(spec.name)
        passes.append(cls(parse_options(spec.name, cls.Options, dict(spec.options))))
    return passes


def _route_options(spec: PassSpec, text: str, inner: Pipeline, registry) -> Pipeline:
    """An alias's options go to the pass of the alias that has them: all of them to an alias of one pass
    (``prune:ratio=0.3``), each to the one pass that declares it otherwise (``int8:method=entropy`` to calibrate,
    ``int8-qat:learn_scales=true`` to qat). An option no pass of the alias has, or several do, is refused."""
    specs = list(inner.specs)
    if len(specs) == 1:
        owners_of = lambda key: [0]  # noqa: E731  (the pass checks its own option names)
    else:
        fields = [_option_names(s.name, registry) for s in specs]
        owners_of = lambda key: [i for i, names in enumerate(fields) if key in names]  # noqa: E731
    for key, value in spec.options:
        owners = owners_of(key)
        if len(owners) != 1:
            which = "none" if not owners else "several (" + ", ".join(specs[i].name for i in owners) + ")"
            raise PipelineError(f"'{spec.name}' is a pipeline alias ({text}): its option '{key}' belongs to {which} "
                                f"of its passes; spell out the passes with the options you want")
        target = specs[owners[0]]
        specs[owners[0]] = PassSpec(target.name, tuple({**dict(target.options), key: value}.items()))
    return Pipeline(tuple(specs))


def _option_names(name: str, registry, seen: tuple[str, ...] = ()) -> set[str]:
    """The options a pipeline element takes: a pass's own, an alias's passes' (through nested aliases: the alias
    inside routes them on)."""
    import dataclasses

    if name in registry.passes:
        return {f.name for f in dataclasses.fields(registry.pass_class(name).Options)}
    alias = registry.pipelines.get(name)
    if alias is None or name in seen:
        return set()
    return set().union(*(_option_names(s.name, registry, (*seen, name)) for s in parse_pipeline(alias.text).specs))


def format_passes(passes: list) -> str:
    """The textual pipeline of resolved passes (aliases expanded, options canonical)."""
    out = []
    for p in passes:
        opts = format_options(p.options)
        out.append(f"{p.name}:{opts}" if opts else p.name)
    return ",".join(out)
