"""The exit-code table in the README is the one the code uses."""

from __future__ import annotations

import os
import re

from graphopt import errors

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
CLASS_OF_ROW = {"usage": errors.UsageError, "unreadable input": errors.InputError,
                "unsupported": errors.UnsupportedError, "pass failure": errors.PassError,
                "equivalence failure": errors.EquivalenceError, "I/O": errors.OutputError}


def readme_table() -> dict[str, int]:
    text = open(README, encoding="utf-8").read()
    rows = re.findall(r"^\| (\d+) \| ([^|]+?) \|", text, flags=re.M)
    return {name: int(code) for code, name in rows}


def test_readme_table_matches_the_error_classes():
    table = readme_table()
    assert table["success"] == 0 and table["internal error"] == errors.INTERNAL_ERROR_EXIT
    assert {name: table[name] for name in CLASS_OF_ROW} == {n: c.exit_code for n, c in CLASS_OF_ROW.items()}
    assert sorted(c.exit_code for c in errors.ERROR_CLASSES) == sorted(table[n] for n in CLASS_OF_ROW)
    assert len(set(table.values())) == len(table)  # one code per class


def test_every_error_graphopt_defines_belongs_to_a_class():
    import graphopt.backends.base
    import graphopt.backends.scheme
    import graphopt.calib.errors  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in subclasses(errors.GraphoptError):
        assert issubclass(cls, errors.ERROR_CLASSES), cls
        assert cls.exit_code in {c.exit_code for c in errors.ERROR_CLASSES}, cls


def test_nothing_raises_the_unclassified_base():
    root = os.path.dirname(README)
    offenders = []
    for folder in ("graphopt", "plugins"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                if f.endswith(".py") and "raise GraphoptError(" in open(os.path.join(dirpath, f)).read():
                    offenders.append(f)
    assert offenders == []
