"""Recipes: a quantization decision written down (YAML), replayed by ``graphopt run MODEL --recipe FILE``.

A recipe records graphopt's version, the model's sha256, the backend analysed and the pipeline that reproduces the
decision there (calibration, then the placement with the groups kept float as node exclusions, then, where the
budget chose a fallback format for some groups, that format's passes restricted to them), each such group's format
(``formats``: ``fp32`` or the fallback's pipeline text), with the metrics it was chosen on, and under ``forms`` the
same decision in each backend's form (:mod:`graphopt.recipe_forms`: onnxruntime / openvino / tensorrt exclusions,
x86 module paths). ``graphopt run MODEL --recipe FILE`` replays the analysed backend's pipeline; with another
``--backend``, that backend's form (none, or x86's, which is for the PyTorch model: one line and no run). It
replays only on the model it was made for: another model, one line and no run. PyYAML reads and writes it when
installed; otherwise graphopt writes (and reads back) the plain subset it needs: ``key: value`` lines whose
values are JSON scalars, lists or mappings, which YAML also reads.
"""

from __future__ import annotations

import json
from typing import Any

from graphopt.errors import UsageError
from graphopt.paths import file_sha256, require_regular

__all__ = ["apply_recipe", "check_recipe", "file_sha256", "read_recipe", "recipe_text"]

KIND = "graphopt-recipe"


def recipe_text(*, model: str, passes: str, backend: str, float_nodes, float_groups, metrics: dict,
                budget: str, forms: dict | None = None, formats: dict | None = None, fallback: str = "",
                fallback_groups=(), holds: bool = True) -> str:
    """The YAML of a recipe for the model file ``model``; ``forms``: each backend's form of the decision
    (:func:`graphopt.recipe_forms.backend_forms`); ``formats``: each group out of static int8 and its format;
    ``fallback``: the fallback format (pipeline text) ``fallback_groups`` run in; ``holds``: whether the budget was
    met (a replay of a decision that missed it says so)."""
    from graphopt import __version__

    data = {"kind": KIND, "graphopt_version": __version__, "model": model, "model_sha256": file_sha256(model),
            "backend": backend, "budget": budget, "holds": bool(holds), "passes": passes,
            "float_groups": list(float_groups),
            "float_nodes": list(float_nodes), "fallback": fallback, "fallback_groups": list(fallback_groups),
            "formats": formats or {g: "fp32" for g in float_groups}, "metrics": metrics, "forms": forms or {}}
    try:
        import yaml
    except ImportError:
        return "".join(f"{k}: {json.dumps(v)}\n" for k, v in data.items())
    return yaml.safe_dump(data, sort_keys=False)


RECIPE_KEYS = ("kind", "graphopt_version", "model", "model_sha256", "backend", "budget", "holds", "passes",
               "float_groups", "float_nodes", "fallback", "fallback_groups", "formats", "metrics", "forms")


def read_recipe(path: str) -> dict[str, Any]:
    require_regular(path, "recipe")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"--recipe {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--recipe {path}: not a text file (a recipe is UTF-8 YAML, written by graphopt "
                         f"sensitivity --recipe)") from None
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:
        data = {}
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, sep, value = line.partition(":")
                try:
                    data[key.strip()] = json.loads(value) if sep else None
                except ValueError:
                    raise UsageError(f"--recipe {path}: line '{line[:60]}' is not 'key: JSON value' (graphopt "
                                     f"reads its own recipes without PyYAML; install pyyaml for others)") from None
    except Exception as exc:  # yaml.YAMLError
        raise UsageError(f"--recipe {path}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("passes"), str):
        raise UsageError(f"--recipe {path}: not a graphopt recipe (written by graphopt sensitivity --recipe)")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:  # an edit, or a recipe of a newer graphopt: what it would mean is not known here
        raise UsageError(f"--recipe {path}: unknown key(s) {', '.join(map(str, unknown))} (a recipe has: "
                         f"{', '.join(RECIPE_KEYS)}; made by graphopt {data.get('graphopt_version')})")
    if not isinstance(data.get("model_sha256"), str):
        raise UsageError(f"--recipe {path}: no model_sha256 (the model it was made for): make the recipe again with "
                         f"graphopt sensitivity --recipe")
    for key, kind in (("backend", str), ("forms", dict), ("model", str)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise UsageError(f"--recipe {path}: '{key}' must be a {'text' if kind is str else 'mapping'}, got "
                             f"{type(data[key]).__name__} (a hand edit? make the recipe again)")
    return data


def replayable(passes: str, path: str) -> str:
    """A recipe's pipeline, refused when a pass option in it names a file: a recipe comes from someone else, and
    must not choose where graphopt reads or writes (give such options on the command line)."""
    from graphopt.passes.pipeline import resolve
    from graphopt.plugins import default_registry

    for pass_ in resolve(passes, default_registry()):
        reads, writes = pass_.files()
        named = [f"{option}={target}" for option, target in writes] + [f"{what} {target}" for what, target in reads]
        if named:
            raise UsageError(f"--recipe {path}: its pass '{pass_!r}' names a file ({named[0]}); a recipe does not "
                             f"choose the files graphopt reads or writes")
    return passes


def check_recipe(recipe: dict, path: str, model: str) -> None:
    """Refuse, in one line, to replay ``recipe`` (read from ``path``) on a model file it was not made for."""
    sha = file_sha256(model)
    if sha != recipe.get("model_sha256"):
        raise UsageError(f"--recipe {path} was made for another model ({recipe.get('model')}, sha256 "
                         f"{str(recipe.get('model_sha256'))[:12]}...), not {model} (sha256 {sha[:12]}...): "
                         f"make a recipe for this model with graphopt sensitivity --recipe")


def apply_recipe(args) -> None:
    """``graphopt run --recipe``: set ``args.passes`` and ``args.backend`` (None: not given) from the recipe, after
    checking it was made for this model: the analysed backend's pipeline, or another ``--backend``'s form."""
    import os

    if args.passes is not None:
        raise UsageError("--recipe gives the passes: drop --passes (the recipe's pipeline already starts with what "
                         "it analysed)")
    recipe = read_recipe(args.recipe)
    if not os.path.isfile(args.model):
        raise UsageError(f"{args.model}: no such file")
    check_recipe(recipe, args.recipe, args.model)
    if recipe.get("holds") is False:
        import sys

        print(f"warning: --recipe {args.recipe}: its budget ({recipe.get('budget')}) was NOT met when it was made: "
              f"this replays the closest placement it tried", file=sys.stderr)
    made = recipe.get("backend") or "onnxruntime"
    spec = args.backend or made
    name = spec.split(":")[0]
    if name == made:
        args.passes, args.backend = replayable(recipe["passes"], args.recipe), spec
        return
    forms = recipe.get("forms") or {}
    form = forms.get(name)
    if not isinstance(form, dict) or not isinstance(form.get("passes", ""), str):
        has = ", ".join([made] + [k for k, v in forms.items() if isinstance(v, dict) and v.get("available")])
        raise UsageError(f"--recipe {args.recipe} has no {name} form (it has: {has}): make it again with graphopt "
                         f"sensitivity --recipe")
    if not form.get("available"):
        raise UsageError(f"--recipe {args.recipe} has no {name} form: {form.get('why')}")
    if name == "x86":
        raise UsageError(f"--recipe {args.recipe}: the x86 form is for the PyTorch model (module paths "
                         f"{', '.join(form.get('module_paths') or []) or 'none'}): graphopt run MODEL.pt2 --backend "
                         f"x86 --passes {form.get('passes')}, or {form.get('x86_inductor')}")
    if not isinstance(form.get("passes"), str):
        raise UsageError(f"--recipe {args.recipe}: its {name} form has no passes (a hand edit? make it again)")
    args.passes, args.backend = replayable(form["passes"], args.recipe), spec
