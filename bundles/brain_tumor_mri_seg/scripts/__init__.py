"""The bundle's own code, reached as ``scripts.tumorseg.*`` from its configs (the model-zoo way:
MONAI puts the bundle's root on ``sys.path`` when it runs a workflow, and so does MONAI Label).

``scripts/tumorseg`` is also the ``tumorseg`` package that ``pip install -e .`` installs (the
repository's ``pyproject.toml`` points at it), so the command-line tools and the bundle share one
copy of every definition.
"""
