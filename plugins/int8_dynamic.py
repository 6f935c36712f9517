"""int8-dynamic: being written (placeholder so the entry point resolves; registers nothing yet)."""
