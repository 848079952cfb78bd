"""Sphinx configuration of the synthmorph-nipype documentation.

Build from the repository root with ``bash docs/build.sh``.
"""

import os

# Nipype's "etelemetry" version check reaches the network on import: keep the build offline
os.environ["NIPYPE_NO_ET"] = "1"

from synthmorph_nipype import __version__  # noqa: E402  (the installed package)

project = "synthmorph-nipype"
author = "synthmorph-nipype developers"
copyright = "synthmorph-nipype developers, Apache-2.0"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
    "nipype.sphinxext.plot_workflow",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: anchors for "page.md#section" links
myst_heading_anchors = 3

# autodoc + napoleon (numpydoc-style docstrings; NiPreps' "Inputs"/"Outputs" sections of
# the workflows are rendered as parameter lists; numpydoc would drop them)
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"  # the Parameters sections say the types
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_custom_sections = [("Inputs", "params_style"), ("Outputs", "params_style")]
napoleon_use_ivar = True  # "Attributes" as fields: autodoc documents the attributes too

# workflow graphs (the ``.. workflow::`` directive in the init_*_wf docstrings)
wf_formats = ["png", "svg"]
wf_html_show_formats = False
wf_html_show_source_link = False
wf_include_source = False

html_theme = "pydata_sphinx_theme"
html_title = f"synthmorph-nipype {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = []
