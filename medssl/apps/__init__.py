"""User-facing commands behind the ``medssl`` CLI."""
