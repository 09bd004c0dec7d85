"""Brain tumour segmentation on 2D MRI slices with MONAI: the code of the bundle
``bundles/brain_tumor_mri_seg``.

An installed package (``pip install -e .`` in this repository, or its wheel elsewhere): the
bundle's configs name its components ``tumorseg.*``, as the model-zoo detection bundles name
``monai.apps.detection``. One sub-package per stage, as nnU-Net lays out its package (each
imported on demand, so ``import tumorseg`` stays light):

- ``tumorseg.io``: ``reading`` (PNG/JPG, NIfTI, DICOM series in the canonical orientation;
  datalists checked), ``writing`` (masks, DICOM SEG, overlays; all-or-nothing output folders),
  ``files`` (atomic writes, digests).
- ``tumorseg.inference``: ``predictor`` (the one predictor behind every entry point), ``inferers``
  (flip TTA, CPU bf16), ``onnx_runtime``, ``predict`` (the ``tumorseg-predict`` command and the
  bundle inference's engine), ``dicomweb`` (studies and series on a PACS).
- ``tumorseg.postprocessing``: ``transforms`` (presence gate, box fit), ``refine`` (the second
  stage), ``presence`` (the learned presence decision), ``volume`` (the 3D rule of a stacked
  volume, keep-largest).
- ``tumorseg.training``: ``losses`` (the poster's Dice + focal loss), ``handlers`` (ignite
  handlers: checkpoints, metrics log, validation panels, report), ``recipe`` (every stage of the
  training recipe from one command).
- ``tumorseg.evaluation``: ``metrics``, ``report``, ``visualize``.
- ``tumorseg.tracking``: ``tracker`` (MLflow on top of MONAI's ``MLFlowHandler``, the registered
  model), ``runs`` (the ``tumorseg-runs`` command).
- ``tumorseg.export``: ``bundle_copy`` (a copy of the bundle with this package's wheel:
  ``tumorseg-export``, MONAI Label), ``pyfunc`` (the MLflow model).
- ``tumorseg.bundle``: where the bundle is, its workflows' config layers, a parser of them.
"""

__version__ = "0.9.2"  # the bundle's version (configs/metadata.json): one release of both

_SUBMODULES = ("bundle", "evaluation", "export", "inference", "io", "postprocessing", "tracking", "training")


def __getattr__(name: str):
    # `import tumorseg` stays light; `tumorseg.training` etc. import on first use
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tumorseg' has no attribute {name!r}")
