"""MONAI Label app that serves every exported bundle under ``model/`` (see README, "MONAI Label").

    make monailabel-app            # exports bundles/brain_tumor_mri_seg into model/
    TUMORSEG_CORS_ORIGINS=http://127.0.0.1:8000 .venv-monailabel/bin/monailabel start_server \
        --app monailabel_app --studies STUDIES --host 127.0.0.1 --port 8000 --conf models brain_tumor_mri_seg

The export is a copy of the bundle: its configs name their components ``tumorseg.*``, the package
installed into MONAI Label's environment from its wheel (``make monailabel-venv``), and each
workflow is layered on ``configs/common.yaml``, the bundle's shared definitions, which this app reads first.

Per bundle: an infer task, a train task (the bundle's training recipe, ``training``, on the
labels saved in the datastore) and, for the first bundle, MC-dropout epistemic scoring; strategies
``random``, ``first`` and ``epistemic``. Training writes into ``models/monailabel/`` of the export
(``model.pt``, ``refiner.pt``, ``stages/``, ``eval/``, ``train_stats.json``), never over the shipped
``models/model.pt``; /infer serves the trained weights once they exist (MONAI Label's model
versioning: the last existing file of the task's path list).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

from monai.transforms import SqueezeDimd
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.scoring.epistemic_v2 import EpistemicScoring
from monailabel.tasks.train.bundle import BundleTrainTask

from tumorseg.files import file_digest

logger = logging.getLogger(__name__)

TRAINED = Path("models") / "monailabel"  # in the bundle: what training from MONAI Label writes
STATS = "train_stats.json"


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


def config_files(config) -> list[str]:
    """A workflow's config files, layered on the bundle's ``configs/common.yaml``."""
    common = Path(config).parent / "common.yaml"
    return [str(common), str(config)] if common.is_file() else [str(config)]


def layered_config(path, config):
    """MONAI Label's ``ConfigParser`` of one bundle config, layered on the bundle's
    ``configs/common.yaml`` (as ``--config_file "['common.yaml', ...]"`` does on the command line)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(config))
    parser.config.update({"bundle_root": path})
    return parser


class Bundle2DInferTask(BundleInferTask):
    """A 2D bundle: the restored mask loses its channel axis, and is written as a uint8 PNG
    unless the request asks otherwise (the default would be the input's extension, a lossy JPEG
    for JPEG slices; ITK's PNG writer refuses float32). The shared preprocessing loads image and
    label; a request has the image only. ``probabilities``: the post-processing stops at the
    sigmoid, at the network's resolution (what MC-dropout scoring needs)."""

    def __init__(self, path, conf, probabilities=False, **kwargs):
        self.probabilities = probabilities
        super().__init__(path, conf, **kwargs)
        # one output channel holding a binary mask: its one label (channel_def "0") has the value 1
        if self.valid and len(self.labels) == 1:
            self.labels = {name: 1 for name in self.labels}
        if self.valid and self.network is not None:
            # model versioning: the shipped weights, then what training wrote; the last existing
            # one is served (BasicInferTask.get_path)
            self.path = [self.path[0], str(Path(path) / TRAINED / "model.pt")]
            # MONAI Label's per-request `model_filename` option names a file in models/ and would
            # always pick the shipped model.pt over the path list: left out
            self._config.pop("model_filename", None)

    def _load_bundle_config(self, path, config):
        return layered_config(path, config)

    def pre_transforms(self, data=None):
        transforms = super().pre_transforms(data)
        for t in transforms:
            if type(t).__name__ == "LoadImageTensord":
                t.keys = (self.key_image,)
        return transforms

    def post_transforms(self, data=None):
        post = super().post_transforms(data)
        if self.probabilities:  # by name: the bundle's classes are re-imported on every call
            post = [t for t in post if type(t).__name__ == "Activationsd"]
        return [*post, SqueezeDimd(keys=self.key_pred, dim=0)]

    def writer(self, data, extension=None, dtype=None):
        extension = extension or data.get("result_extension") or ".png"
        return super().writer(data, extension=extension, dtype=dtype or data.get("result_dtype") or "uint8")


class Bundle2DTrainTask(BundleTrainTask):
    """MONAI Label's bundle trainer running the bundle's training recipe (train.yaml's
    ``training``: every stage, as ``python -m monai.bundle run training`` runs it) on the labels
    of the datastore, writing into ``models/monailabel/`` of the bundle (``ckpt_dir``: the
    published ``model.pt`` and ``refiner.pt``, ``stages/``; ``output_dir``: ``eval/``), and
    ``train_stats.json`` there after each run, which ``stats()`` (``/info`` ``train_stats``) returns."""

    def _load_bundle_config(self, path, config):
        return layered_config(path, config)

    @property
    def trained(self) -> Path:
        return Path(self.bundle_path) / TRAINED

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle)
        # the best model is saved by the validator: with too few labels to hold one out (2 labels
        # at val_split 0.2), validate on the training labels rather than on nothing
        if val == []:
            val = train
        self._sizes = (len(train), len(val) if val else 0)
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        # the recipe's first stage starts from init_weights, not from a loader handler MONAI Label
        # adds (every stage would load it, the refiner too): what /infer serves, the weights
        # trained last, else the shipped ones
        self._start_weights = None
        if not pretrained:
            return
        newest = self.trained / "model.pt"
        if newest.is_file() and Path(model_pytorch) == Path(self.bundle_path) / "models" / "model.pt":
            model_pytorch = str(newest)
        if Path(model_pytorch).is_file():
            self._start_weights = model_pytorch

    def _update_overrides(self, overrides):
        overrides["max_epochs"] = overrides.pop(self.const.key_train_trainer_max_epochs())  # every stage's
        overrides.update(
            {"ckpt_dir": str(self.trained), "output_dir": str(self.trained / "eval"), "init_weights": self._start_weights}
        )
        return overrides

    def run_single_gpu(self, request, overrides):
        # as MONAI Label's multi-GPU path does: the bundle's configs with its overrides merged into
        # one file, run by the bundle's command line (each stage of the recipe a process)
        config = layered_config(self.bundle_path, self.bundle_config_path)
        tracking = overrides.pop("tracking", None)  # a workflow setting, not a config key
        for key, value in overrides.items():
            config[key] = f"$torch.device('{value}')" if key == self.const.key_device() else value
        self.trained.mkdir(parents=True, exist_ok=True)
        merged = self.trained / "train_config.json"
        config.export_config_file(config.config, str(merged), indent=1)
        command = [sys.executable, "-m", "monai.bundle", "run", request.get("run_id") or "training",
                   "--config_file", json.dumps([str(merged)]), "--meta_file", self.bundle_metadata_path,
                   "--bundle_root", self.bundle_path] + (["--tracking", tracking] if tracking else [])  # fmt: skip
        subprocess.run(command, check=True)

    def __call__(self, request, datastore):
        start = time.time()
        self._start_weights, self._sizes = None, (0, 0)
        result = super().__call__(request, datastore)
        recipe = self.trained / "stages" / "recipe.json"
        metrics = self.trained / "eval" / "stages" / "segmentation" / "metrics.jsonl"
        epochs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        weights = self.trained / "model.pt"
        if epochs and weights.is_file() and recipe.is_file():
            best = max(epochs, key=lambda e: e.get("val_mean_dice", float("-inf")))
            stats = {
                "total_time": round(time.time() - start, 1),
                "stages": list(json.loads(recipe.read_text())["stages"]),
                "epochs": len(epochs),  # of the first stage
                "best_metric": best.get("val_mean_dice"),  # val_mean_dice, the bundle's key metric
                "best_metric_epoch": best["epoch"],
                "train_images": self._sizes[0],
                "val_images": self._sizes[1],
                "start_weights": os.path.relpath(self._start_weights, self.bundle_path) if self._start_weights else None,
                "weights": TRAINED.joinpath("model.pt").as_posix(),
                "sha256": file_digest(weights, None),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            path = self.trained / STATS
            path.with_suffix(".tmp").write_text(json.dumps(stats, indent=2))
            os.replace(path.with_suffix(".tmp"), path)  # the server reads it on every /info
        return result

    def stats(self):
        path = self.trained / STATS
        return json.loads(path.read_text()) if path.is_file() else {}


class SerialEpistemicScoring(EpistemicScoring):
    """MONAI Label's MC-dropout scoring, one image at a time: its default two threads race in the
    bundle task, which re-reads the bundle's configs on every call."""

    def __call__(self, request, datastore):
        return super().__call__({**request, "max_workers": 1}, datastore)


def close_cors() -> None:
    """MONAI Label allows every origin unless MONAI_LABEL_CORS_ORIGINS is set, and in 0.8.5 (with
    pydantic 2) setting it crashes `monailabel start_server` (it json-dumps the parsed URLs). Its
    FastAPI app exists before this file loads, so its CORS middleware is configured here, before
    the first request: the origins in TUMORSEG_CORS_ORIGINS (comma-separated), none by default."""
    server = sys.modules.get("monailabel.app")
    if server is None:  # a training or scoring subprocess: no HTTP server
        return
    from fastapi.middleware.cors import CORSMiddleware

    origins = [o.strip().rstrip("/") for o in os.environ.get("TUMORSEG_CORS_ORIGINS", "").split(",") if o.strip()]
    for middleware in server.app.user_middleware:
        if middleware.cls is CORSMiddleware:
            middleware.kwargs["allow_origins"] = origins
    server.app.middleware_stack = None  # rebuilt from user_middleware on the next request
    logger.info(f"CORS allowed origins: {origins}")


class TumorSegApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = Path(app_dir) / "model"
        wanted = [m.strip() for m in conf.get("models", "").split(",") if m.strip()]
        found = sorted(p for p in self.model_dir.glob("*") if (p / "configs").is_dir()) if self.model_dir.is_dir() else []
        self.bundles = {p.name: p for p in found if not wanted or p.name in wanted}
        if not self.bundles:
            raise RuntimeError(f"no exported bundle under {self.model_dir} (run `make monailabel-app`)")
        # sessions (uploaded images) under the app unless MONAI_LABEL_SESSION_PATH says otherwise;
        # MONAI Label's default is ~/.cache/monailabel/sessions. Read in MONAILabelApp.__init__.
        if not settings.MONAI_LABEL_SESSION_PATH:
            settings.MONAI_LABEL_SESSION_PATH = str(Path(app_dir).resolve() / "sessions")
        close_cors()
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

    def init_trainers(self):
        return {name: Bundle2DTrainTask(str(path), self.conf) for name, path in self.bundles.items()}

    def init_strategies(self):
        return {"random": Random(), "first": First(), "epistemic": Epistemic()}

    def init_scoring_methods(self):
        # MC dropout (the UNet has dropout): the network in train mode, several runs per unlabeled
        # image, the entropy of the mean sigmoid as the image's `epistemic_entropy`, which the
        # `epistemic` strategy ranks by. Instance norm behaves the same in train mode.
        path = next(iter(self.bundles.values()))
        task = Bundle2DInferTask(str(path), self.conf, probabilities=True, train_mode=True, skip_writer=True)
        return {"epistemic": SerialEpistemicScoring(task, simulation_size=5)}
