"""
Sphinx configuration for the twistauth documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html``.  The
reference pages are generated from the code by the local extension in
``_ext/twistauth_docs.py``, so this checkout's ``twistauth`` is imported
(not an installed copy).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "_ext"))

from twistauth._version import __version__  # noqa: E402

project = "twistauth"
author = "the twistauth authors"
copyright = "the twistauth authors"
version = release = __version__

extensions = ["twistauth_docs"]

root_doc = master_doc = "index"
exclude_patterns = ["_build"]
templates_path: list = []
default_role = "literal"
highlight_language = "text"
pygments_style = "sphinx"

html_theme = "alabaster"
html_theme_options = {
    "description": "Twisted authentication and session server",
    "fixed_sidebar": True,
}
html_static_path: list = []
html_show_sourcelink = False
