"""MONAI Label app that serves every exported bundle under ``model/`` (see README, "MONAI Label").

    make monailabel-app            # exports bundles/brain_tumor_mri_seg into model/
    .venv-monailabel/bin/monailabel start_server --app monailabel_app --studies STUDIES \
        --host 127.0.0.1 --port 8000 --conf models brain_tumor_mri_seg

The export is a copy of the bundle: its configs reach the bundle's own code as
``scripts.tumorseg.*`` (MONAI Label puts the bundle on ``sys.path``), and each workflow is layered
on ``configs/common.yaml``, the bundle's shared definitions, which this app reads first.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

from monai.transforms import SqueezeDimd
from monailabel.interfaces.app import MONAILabelApp

logger = logging.getLogger(__name__)


def _bundle_infer_task_class():
    # monailabel.transform.post imports torchvision.utils at import time, for a debug transform
    # only; no torchvision works beside the CPU torch, so a stub stands in for that one import.
    stubs = {}
    if "torchvision" not in sys.modules:
        package, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        utils.make_grid = utils.save_image = None
        package.utils = utils
        stubs = {"torchvision": package, "torchvision.utils": utils}
        sys.modules.update(stubs)
    try:
        from monailabel.tasks.infer.bundle import BundleInferTask
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return BundleInferTask


BundleInferTask = _bundle_infer_task_class()


def layered_config(path, config):
    """MONAI Label's ``ConfigParser`` of one bundle config, layered on the bundle's
    ``configs/common.yaml`` (as ``--config_file "['common.yaml', ...]"`` does on the command line)."""
    from monai.bundle import ConfigParser

    common = Path(config).parent / "common.yaml"
    parser = ConfigParser()
    parser.read_config([str(common), str(config)] if common.is_file() else str(config))
    parser.config.update({"bundle_root": path})
    return parser


class Bundle2DInferTask(BundleInferTask):
    """A 2D bundle: the restored mask loses its channel axis, and is written as a uint8 PNG
    unless the request asks otherwise (the default would be the input's extension, a lossy JPEG
    for JPEG slices; ITK's PNG writer refuses float32). The shared preprocessing loads image and
    label; a request has the image only."""

    def __init__(self, path, conf, **kwargs):
        super().__init__(path, conf, **kwargs)
        # one output channel holding a binary mask: its one label (channel_def "0") has the value 1
        if self.valid and len(self.labels) == 1:
            self.labels = {name: 1 for name in self.labels}

    def _load_bundle_config(self, path, config):
        return layered_config(path, config)

    def pre_transforms(self, data=None):
        transforms = super().pre_transforms(data)
        for t in transforms:
            if type(t).__name__ == "LoadImageTensord":
                t.keys = (self.key_image,)
        return transforms

    def post_transforms(self, data=None):
        return [*super().post_transforms(data), SqueezeDimd(keys=self.key_pred, dim=0)]

    def writer(self, data, extension=None, dtype=None):
        extension = extension or data.get("result_extension") or ".png"
        return super().writer(data, extension=extension, dtype=dtype or data.get("result_dtype") or "uint8")


class TumorSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = Path(app_dir) / "model"
        wanted = [m.strip() for m in conf.get("models", "").split(",") if m.strip()]
        found = sorted(p for p in self.model_dir.glob("*") if (p / "configs").is_dir()) if self.model_dir.is_dir() else []
        self.bundles = {p.name: p for p in found if not wanted or p.name in wanted}
        if not self.bundles:
            raise RuntimeError(f"no exported bundle under {self.model_dir} (run `make monailabel-app`)")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="tumorseg",
            description="Brain tumour segmentation on 2D MRI slices",
            version="0.1.0",
        )

    def init_infers(self):
        return {name: Bundle2DInferTask(str(path), self.conf) for name, path in self.bundles.items()}


os.environ.setdefault("MONAI_LABEL_SESSION_PATH", str(Path(__file__).resolve().parent / "sessions"))
