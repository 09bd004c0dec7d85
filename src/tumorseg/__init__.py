"""Brain tumour segmentation on 2D MRI slices with MONAI: the code of the bundle
``bundles/brain_tumor_mri_seg``.

An installed package (``pip install -e .`` in this repository, or its wheel elsewhere): the
bundle's configs name its components ``tumorseg.*``, as the model-zoo detection bundles name
``monai.apps.detection``. Modules (imported on demand, so ``import tumorseg`` stays light):

- ``tumorseg.bundle``: where the bundle is, its workflows' config files, a parser of them.
- ``tumorseg.losses``: the poster's combined Dice + focal loss.
- ``tumorseg.metrics``: per-image and pooled tumour metrics, the poster's metric set.
- ``tumorseg.handlers``: validation panels and the evaluation report (ignite handlers).
- ``tumorseg.tracking``: MLflow tracking on top of MONAI's ``MLFlowHandler``; the registered
  model, a pyfunc (``tumorseg.pyfunc``) that runs the bundle's inference.
- ``tumorseg.runs``: the ``tumorseg-runs`` command, to list tracked runs.
- ``tumorseg.reading``, ``tumorseg.predictor``, ``tumorseg.writing``, ``tumorseg.predict``: new
  scans, read (canonical orientation), predicted and written (the ``tumorseg-predict`` command).
- ``tumorseg.export``: a copy of the bundle, for MONAI Label (``tumorseg-export``).
"""

__version__ = "0.8.0"  # the bundle's version (configs/metadata.json): one release of both

_SUBMODULES = (
    "bundle", "export", "files", "handlers", "inferers", "losses", "metrics", "predict", "predictor", "reading", "report",
    "presence", "runs", "tracking", "transforms", "visualize", "writing",
)  # fmt: skip


def __getattr__(name: str):
    # `import tumorseg` stays light; `tumorseg.losses` etc. import on first use (also in configs)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tumorseg' has no attribute {name!r}")
