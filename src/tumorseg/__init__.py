"""Brain tumour segmentation on 2D MRI slices with MONAI.

Modules (imported on demand, so ``import tumorseg`` stays light):

- ``tumorseg.losses``: the poster's combined Dice + focal loss.
- ``tumorseg.metrics``: per-image and pooled tumour metrics, the poster's metric set.
- ``tumorseg.handlers``: validation panels and the evaluation report (ignite handlers).
- ``tumorseg.tracking``: MLflow tracking on top of MONAI's ``MLFlowHandler``.
- ``tumorseg.runs``: the ``tumorseg-runs`` command, to list tracked runs.
"""

__version__ = "0.1.0"

_SUBMODULES = ("files", "handlers", "inferers", "losses", "metrics", "runs", "tracking", "transforms", "visualize")


def __getattr__(name: str):
    # `import tumorseg` stays light; `tumorseg.losses` etc. import on first use (also in configs)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tumorseg' has no attribute {name!r}")
