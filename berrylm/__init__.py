"""berrylm: from text to a tiny language model answering over the OpenAI API on an edge box.

The stages are subpackages, and imports flow one way (tests/test_layering.py keeps it so):

    kernels <- model <- {train, export, serve} <- ui        bench and cli.py sit on top

This file imports nothing: the calculator's sandbox worker starts with `python -E -S` and imports
`berrylm.serve.tools...` through it, stdlib only.
"""

__version__ = "0.1.0"
