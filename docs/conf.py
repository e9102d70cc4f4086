"""Sphinx configuration of jax_psroi's documentation (MyST Markdown pages,
API pages from the docstrings, doctested examples)."""

import os
import sys
import warnings

# The package from this checkout when it is not installed (a pure-Python
# import runs every operator on its XLA path, with the same results); an
# installed copy, as in CI, comes first.
sys.path.append(os.path.abspath(".."))
# Without the compiled module the import warns that the XLA path runs.
warnings.filterwarnings("ignore", category=RuntimeWarning,
                        message=r"(?s).*jax_psroi.*")

project = "jax_psroi"
author = "jax_psroi authors"
copyright = "jax_psroi authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "requirements.txt"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
# The package's annotation aliases, shown by name rather than expanded.
autodoc_type_aliases = {name: name for name in (
    "ArrayLike", "Boxes", "OutputSize", "DataFormat", "ChannelOrder", "DTypeLike")}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Every doctest group starts from these imports; the examples run on the CPU.
doctest_global_setup = """
import warnings
warnings.filterwarnings("ignore", category=RuntimeWarning)
import jax
jax.config.update("jax_platforms", "cpu")
import jax.numpy as jnp
import numpy as np
import jax_psroi
"""
doctest_default_flags = (__import__("doctest").ELLIPSIS
                         | __import__("doctest").NORMALIZE_WHITESPACE)

html_theme = "alabaster"
html_title = "jax_psroi"
html_static_path = []


def _literal_blocks(app, what, name, obj, options, lines):
    """A paragraph that ends with ":" before an indented block (the
    docstrings' tables and code, written for reading as plain text)
    introduces a literal block: make it "::". Runs after napoleon, whose
    sections (Args:, Returns:) are fields by then."""
    for index in range(len(lines) - 2):
        line, blank, block = lines[index], lines[index + 1], lines[index + 2]
        indent = len(line) - len(line.lstrip())
        if (line.rstrip().endswith(":") and not line.rstrip().endswith("::")
                and not line.lstrip().startswith(":") and not blank.strip()
                and block.strip() and len(block) - len(block.lstrip()) > indent):
            lines[index] = line.rstrip() + ":"


def _linen_signature(app, what, name, obj, options, signature, return_annotation):
    """Linen modules' dataclass fields end with Flax's own ``parent`` and
    ``name``; the pages show the module's settings only."""
    if name.startswith("jax_psroi.flax.linen.") and signature and ", parent=" in signature:
        signature = signature.split(", parent=")[0] + ")"
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-docstring", _literal_blocks, priority=600)
    app.connect("autodoc-process-signature", _linen_signature)
