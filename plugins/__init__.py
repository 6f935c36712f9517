"""graphopt's built-in passes (importable as ``graphopt_plugins``), one pass per module.

Each module registers itself through the ``graphopt.plugins`` entry-point group declared in pyproject.toml,
exactly as a third-party plugin would.
"""
