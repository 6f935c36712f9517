"""A plugin module that raises when imported (for the test that `-p` of a broken plugin is an error)."""

raise RuntimeError("this plugin is broken on purpose")
