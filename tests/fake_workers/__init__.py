"""Test-only workers that exercise the CLI, settings and archive contracts."""
