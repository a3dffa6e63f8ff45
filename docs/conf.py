"""Sphinx configuration for the pyro_natgrad documentation.

Build with warnings as errors, as CI does (tests/test_docs.py)::

    sphinx-build -W -b html docs docs/_build/html
"""

import configparser
import os
import sys

# Document the package in this checkout, whether or not it is installed.
DOCS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DOCS_DIR)
sys.path.insert(0, REPO_ROOT)

# One source of truth for the version: setup.cfg.
_setup_cfg = configparser.ConfigParser()
_setup_cfg.read(os.path.join(REPO_ROOT, "setup.cfg"))

project = "pyro_natgrad"
author = "pyro_natgrad developers"
copyright = "2026, pyro_natgrad developers"
release = _setup_cfg.get("metadata", "version", fallback="unknown")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# Cross-references that cannot be resolved (torch.Tensor, say, without
# intersphinx) are not errors. Every other warning is: the build runs with -W,
# and no warning type is suppressed.
nitpicky = False

# autodoc: members in source order, with signatures as written. A class listed
# in an automodule's :members: gets its documented methods and properties too.
# "members" is deliberately NOT a default option: with Sphinx 9 a default
# `members` overrides an explicit `:members: a, b` list, and a listed name that
# is missing from the module would then be skipped silently instead of warned
# about (and so failing the -W build).
autodoc_default_options = {
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"

# napoleon: accept Google- and NumPy-style docstrings next to plain reST fields.
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = True

html_theme = "alabaster"
html_theme_options = {
    "description": "Natural-gradient variational inference for Pyro",
    "fixed_sidebar": True,
}
html_title = f"pyro_natgrad {release}"
