"""This package's version and the mergekit release it is built and tested against (no imports)."""

__version__ = "0.1.0"

# the mergekit release this package is built and tested against (pyproject pins it)
SUPPORTED_MERGEKIT = "0.1.5"
