"""The package version, in a module of its own so that modules inside the package need not import the
package itself (`from trl_nullspace import __version__` runs `__init__` first, an upward import)."""

__version__ = "0.1.0"  # pyproject.toml reads it from here (dynamic version)
