"""The embedded end-to-end demo: `python -m trl_nullspace.demo` (or `make demo`)."""
