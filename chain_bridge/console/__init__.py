"""The operator's web console (docs/console.md)."""
