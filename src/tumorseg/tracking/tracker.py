"""Experiment tracking: MONAI's ``MLFlowHandler`` extended for reviewing runs in the MLflow UI.

The bundle's MLflow settings (``configs/mlflow.json``, given to ``--tracking``) put an
:class:`MLflowTracker` on the trainer and the validator instead of the plain handler; runs,
metrics and the store stay MONAI's.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from tumorseg.io.files import file_digest

__all__ = [
    "MLflowTracker",
    "run_name",
    "environment_params",
    "store_lock",
    "open_store",
    "training_run_id",
    "fail_open_runs",
]


logger = logging.getLogger(__name__)

# what the logged pyfunc model imports (the bundle's inference), pinned to the versions at hand
MODEL_REQUIREMENTS = (
    "torch", "monai", "pytorch-ignite", "pyyaml", "pillow", "scikit-image", "scipy", "nibabel", "pydicom", "highdicom",
)  # fmt: skip


_OPEN: dict[int, MLFlowHandler] = {}  # the trackers of this process whose run started and was not closed


def fail_open_runs() -> None:
    """End FAILED every run this process started and did not close. The bundle's exception hook
    (``tumorseg.bundle``) calls it: a workflow that dies in an exception never reaches the
    tracker's close, and its run would stay RUNNING in the UI for good."""
    while _OPEN:
        _, tracker = _OPEN.popitem()
        if tracker.cur_run is not None:
            try:
                tracker.client.set_terminated(tracker.cur_run.info.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the error being reported matters more than its record
                pass


def run_name(workflow: str, record: str | None = None) -> str:
    """A readable, sortable run name ``<workflow>_<YYYYmmdd_HHMMSS>_<4 hex>``, or, when resuming,
    the name kept in ``record`` by the interrupted run, so MLflow continues that run (MONAI's
    handler reuses an unfinished run of the same name) instead of starting an orphan. The random
    suffix keeps runs started in the same second (a sweep into one server) apart for that reason."""
    if record and Path(record).is_file():
        return Path(record).read_text().strip()
    return f"{workflow}_{time.strftime('%Y%m%d_%H%M%S')}_{os.urandom(2).hex()}"


def environment_params(device=None) -> dict[str, str]:
    """Code and machine a run ran on: package versions, git commit, device, threads, world size."""
    import ignite
    import mlflow
    import monai
    import torch

    from tumorseg import __version__ as tumorseg_version

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    return {
        "code.tumorseg_version": tumorseg_version,
        "code.git_commit": commit or "unknown",
        "code.monai_version": monai.__version__,
        "code.torch_version": torch.__version__,
        "code.ignite_version": ignite.__version__,
        "code.mlflow_version": mlflow.__version__,
        "machine.device": str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
        "machine.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "machine.torch_threads": str(torch.get_num_threads()),
        "machine.cpu_count": str(os.cpu_count()),
        "machine.world_size": str(world),
        "machine.platform": platform.platform(),
    }


@contextmanager
def store_lock(tracking_uri: str | None = None):
    """Hold a file lock beside a local SQLite store (``<db>.lock``) for the duration.

    MLflow creates its tables when a client first opens a new store, and MONAI creates the
    experiment on first use; processes doing either at the same moment (runs started side by
    side into a fresh ``mlflow/``) fail with "table already exists". ``MLFLOW_TRACKING_URI``
    takes priority over ``tracking_uri`` (as in MONAI); other backends need no lock.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or ""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock  # a dependency of torch

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        yield


def open_store(tracking_dir: str | Path, experiment: str = "brain_tumor_mri_seg"):
    """``(MlflowClient, experiment_id)`` of the store ``<tracking_dir>/mlruns.db``, or of the
    server ``MLFLOW_TRACKING_URI`` names (as MONAI's handler does), creating the experiment: in a
    local store with its artifacts beside the store (as ``configs/mlflow.json`` does), on a
    server where the server keeps them."""
    import mlflow
    from monai.utils import path_to_sqlite_uri

    root = Path(tracking_dir).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or path_to_sqlite_uri(str(root / "mlruns.db"))
    artifacts = (root / "mlruns").as_uri() if uri.startswith("sqlite:") else None
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location=artifacts)
    return client, experiment_id


def training_run_id(client, experiment_id: str, digest: str) -> str | None:
    """The newest training run whose best checkpoint has SHA-256 ``digest`` (its
    ``checkpoint_sha256`` tag), or None: where runs of those weights nest in the UI."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.checkpoint_sha256 = '{digest}' and tags.workflow = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def _joined(path: str) -> str:
    # MONAI's patch_bundle_tracking builds save_execute_config by appending " + '/config_….json'"
    # to the raw output_dir; when output_dir was overridden with a plain path (no "$") that stays
    # a literal string. Join it so the executed config is still found.
    match = re.fullmatch(r"(.+) \+ '(/[^']+)'", path)
    return match.group(1) + match.group(2) if match and not Path(path).exists() else path


class MLflowTracker(MLFlowHandler):
    """``MLFlowHandler`` that also records what a reviewer needs in the MLflow UI.

    On top of MONAI's metrics, parameters and artifacts it:

    - logs the code and machine (:func:`environment_params`) as parameters beside MONAI's
      ``experiment_param`` (the run's readable hyper-parameters: ``run_params`` of the bundle
      config), and sets ``tags``; the executed config itself is an artifact;
    - uploads, at the end of each epoch, the files other handlers register in
      ``engine.state.tracked_files`` (validation panels, reports);
    - logs the mean training loss of each epoch (``epoch_loss``) with the epoch as its step, like
      every other per-epoch metric, so that no curve mixes iterations and epochs on one axis;
    - at the end of training, logs the best checkpoint as an MLflow pyfunc model that segments
      slices of any number and size with the bundle's inference (:func:`log_bundle_model`),
      registers it as ``registered_model_name`` and tags the run with the checkpoint's SHA-256;
    - for an evaluation of ``source_checkpoint``, links the run to the training run that made
      that checkpoint (``mlflow.parentRunId``, so the UI nests it there, and ``trained_by_run``).

    Args:
        tags: tags set on the run when it starts.
        config_file: the executed config (MONAI's ``save_execute_config``).
        checkpoint: the best-model state dict written during training, logged as the run's model.
        registered_model_name: Model Registry name; None logs the model without registering it.
        model_config: the config overrides the weights need (network size, post-processing).
        epoch_loss: log the epoch's mean of ``output_transform`` as ``tag_name``, and the learning
            rate of each parameter group (``lr_group_<i>``), with the epoch as step.
        metric_prefixes: metric name prefixes to replace, e.g. ``{"val_": "eval_"}`` for an
            evaluation, whose validator metrics are not a validation during training.
        engine_params: log MONAI's default parameters of the engine (``max_epochs``,
            ``epoch_length``): a training's; an evaluation's (1 epoch) would only mislead.
        source_checkpoint: for evaluation runs, the checkpoint being evaluated.
        run_record: file to keep the run's name in, for :func:`run_name` when resuming.
        parent_run: name of the recipe's parent run (:class:`tumorseg.training.recipe.Recipe`): the run
            is nested under it (created by the first stage, in the same experiment), and the
            parent's id and store are written to ``recipe_record`` for the recipe to end it.
        recipe_record: where to write them.
        kwargs: everything ``monai.handlers.MLFlowHandler`` takes.
    """

    def __init__(
        self,
        tags: dict | None = None,
        config_file: str | None = None,
        checkpoint: str | None = None,
        registered_model_name: str | None = None,
        model_config: dict | None = None,
        epoch_loss: bool = False,
        metric_prefixes: dict | None = None,
        engine_params: bool = True,
        source_checkpoint: str | None = None,
        run_record: str | None = None,
        parent_run: str | None = None,
        recipe_record: str | None = None,
        **kwargs,
    ) -> None:
        self.store_uri = kwargs.get("tracking_uri")
        with store_lock(self.store_uri):  # MLflow opens (and may create) the store here
            super().__init__(**kwargs)
        self.run_record = run_record
        self.parent_run = parent_run
        self.recipe_record = recipe_record
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.config_file = _joined(config_file) if config_file else None
        self.checkpoint = checkpoint
        self.registered_model_name = registered_model_name
        self.model_config = dict(model_config or {})
        self.epoch_loss = epoch_loss
        self._losses: list = []  # tensors (kept on the device) or floats
        self.metric_prefixes = dict(metric_prefixes or {})
        if not engine_params:
            self.default_tracking_params = []
        self.source_checkpoint = source_checkpoint
        self.artifacts = tuple(_joined(a) if isinstance(a, str) else a for a in self.artifacts)

    def start(self, engine: Engine) -> None:
        new_run = self.cur_run is None
        with store_lock(self.store_uri):  # the experiment may be created here
            super().start(engine)
        if not new_run:
            return
        assert self.cur_run is not None  # MONAI's start made it (or found it by name: resumed)
        _OPEN[id(self)] = self
        run_id = self.cur_run.info.run_id
        if self.cur_run.info.status != "RUNNING":  # a resumed run that had failed or was killed
            self.client.update_run(run_id, status="RUNNING")
        if self.run_record:
            from tumorseg.io.files import write_atomic

            write_atomic(self.run_record, self.cur_run.info.run_name.encode())
        for key, value in self.tags.items():
            self.client.set_tag(run_id, key, value)
        if self.parent_run:
            self.client.set_tag(run_id, "mlflow.parentRunId", self._recipe_run_id())
        self._log_params(environment_params())
        if self.source_checkpoint and Path(self.source_checkpoint).is_file():
            self._link_to_training_run(run_id, file_digest(self.source_checkpoint, None))

    def _recipe_run_id(self) -> str:
        """The id of the parent run named ``parent_run``, created (tagged ``workflow: recipe``) if new."""
        import json

        from tumorseg.io.files import write_atomic

        assert self.experiment is not None
        with store_lock(self.store_uri):
            found = self.client.search_runs(
                [self.experiment.experiment_id], filter_string=f"attributes.run_name = '{self.parent_run}'"
            )
            if found and found[0].info.status != "RUNNING":  # a resumed recipe: its parent runs again
                self.client.update_run(found[0].info.run_id, status="RUNNING")
            run = (
                found[0]
                if found
                else self.client.create_run(
                    self.experiment.experiment_id, run_name=self.parent_run, tags={**self.tags, "workflow": "recipe"}
                )
            )
        if self.recipe_record:
            record = {"run_id": run.info.run_id, "run_name": self.parent_run, "tracking_uri": self.client.tracking_uri}
            write_atomic(self.recipe_record, json.dumps(record).encode())
        return run.info.run_id

    def _log_params(self, params: dict) -> None:
        """MONAI's, for a resumed run too. MLflow refuses to change a logged parameter, so a value
        that differs from the first attempt's (the same datalist spelt another way, more epochs to
        carry on with, another commit) is kept as the tag ``resumed.<key>`` and said in the log,
        where MLflow's refusal used to end the stage; new ones go in batches of 100, MLflow's most."""
        assert self.cur_run is not None
        run_id = self.cur_run.info.run_id
        logged = self.client.get_run(run_id).data.params
        values = {key: str(value) for key, value in params.items()}
        for key, value in values.items():
            if key in logged and logged[key] != value:
                logger.warning(
                    "resumed run %s: %s was %r, now %r (tag resumed.%s)", self.cur_run.info.run_name, key, logged[key], value, key
                )
                self.client.set_tag(run_id, f"resumed.{key}", value)
        todo = [(key, value) for key, value in values.items() if key not in logged]
        for i in range(0, len(todo), 100):
            super()._log_params(dict(todo[i : i + 100]))

    def _link_to_training_run(self, run_id: str, digest: str) -> None:
        self.client.set_tag(run_id, "checkpoint_sha256", digest)
        assert self.experiment is not None
        parent = training_run_id(self.client, self.experiment.experiment_id, digest)
        if parent:
            self.client.set_tag(run_id, "mlflow.parentRunId", parent)
            self.client.set_tag(run_id, "trained_by_run", parent)

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for old, new in self.metric_prefixes.items():
            metrics = {new + k[len(old) :] if k.startswith(old) else k: v for k, v in metrics.items()}
        super()._log_metrics(metrics, step)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.epoch_loss:
            from ignite.engine import Events

            def keep_loss(e: Engine) -> None:
                loss = self.output_transform(e.state.output)
                if isinstance(loss, (tuple, list)):  # from_engine on a batch the trainer did not decollate
                    loss = loss[0]
                # kept as it is (on the GPU during GPU training): a float() here would wait for
                # the GPU at every iteration; the epoch's mean is read once, at its end
                self._losses.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))

            engine.add_event_handler(Events.ITERATION_COMPLETED, keep_loss)

    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        if self.epoch_loss and self._losses and self.cur_run is not None:
            metrics = {self.tag_name: float(sum(self._losses)) / len(self._losses)}
            optimizer = getattr(engine, "optimizer", None)  # the learning rate the epoch ended with
            for i, group in enumerate(optimizer.param_groups if optimizer is not None else []):
                metrics[f"lr_group_{i}"] = float(group["lr"])
            self._log_metrics(metrics, step=engine.state.epoch)
            self._losses = []
        self.upload_registered(engine)

    def upload_registered(self, engine: Engine) -> None:
        files = getattr(engine.state, "tracked_files", None)
        if not files or self.cur_run is None:
            return
        while files:
            path, artifact_path = files.pop(0)
            if Path(path).is_file():
                self.client.log_artifact(self.cur_run.info.run_id, path, artifact_path)

    def close(self) -> None:
        _OPEN.pop(id(self), None)
        super().close()

    def complete(self) -> None:
        super().complete()
        if self.cur_run is not None and self.checkpoint and Path(self.checkpoint).is_file():
            run_id = self.cur_run.info.run_id
            log_bundle_model(self.client, run_id, self.checkpoint, self.registered_model_name, self.model_config)


def log_bundle_model(
    client,
    run_id: str,
    checkpoint,
    registered_model_name: str | None,
    model_config: dict | None = None,
    bundle=None,
    description: str | None = None,
) -> str | None:
    """Log ``checkpoint`` as the run's MLflow model, a pyfunc that segments slices of any number
    and size with the bundle's own inference (:mod:`tumorseg.export.pyfunc`), and register it as
    ``registered_model_name``. ``model_config``: the config overrides the weights need (network
    size, post-processing settings). The registered version gets ``description``, the run's best
    validation metrics and its data digest as tags, and, where the weights are the bundle's
    shipped ``models/model.pt``, the alias ``shipped``. Tags the run with the checkpoint's SHA-256.
    Returns the registered version (None when not registered)."""
    import importlib.metadata
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from tumorseg.bundle import BUNDLE
    from tumorseg.export.bundle_copy import build_wheel, write_bundle

    bundle = Path(bundle or BUNDLE)
    digest = file_digest(checkpoint, None)
    client.set_tag(run_id, "checkpoint_sha256", digest)
    slices = TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))  # one unnamed tensor: predict gets the array
    masks = TensorSpec(np.dtype(np.uint8), (-1, 1, -1, -1))
    versions = {"torch": torch.__version__.split("+")[0]}
    pins = [f"{name}=={versions.get(name) or importlib.metadata.version(name)}" for name in MODEL_REQUIREMENTS]
    # the fluent API needs the global URI, which mlflow also puts into the environment (where
    # MONAI's handler would read it): restore both afterwards, unset if they were unset
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / bundle.name
            write_bundle(copy, bundle, Path(checkpoint))
            wheel = build_wheel(Path(tmp) / "wheel")
            # the model's code is this package, as a wheel among its artifacts: MLflow installs the
            # requirements from the model folder, where the artifact lies at artifacts/<name>
            pins.append(f"artifacts/{wheel.name}")
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(Path(__file__).parents[1] / "export" / "pyfunc.py"),
                    artifacts={"bundle": str(copy), wheel.name: str(wheel)},
                    model_config=dict(model_config or {}),
                    signature=ModelSignature(inputs=Schema([slices]), outputs=Schema([masks])),
                    registered_model_name=registered_model_name,
                    pip_requirements=pins,  # stated, not inferred: inferring imports the model and takes long
                )
    finally:
        mlflow.set_tracking_uri(previous_uri)  # type: ignore[arg-type]  # None: unset again, as it was
    version = getattr(info, "registered_model_version", None)
    if not registered_model_name or version is None:
        return None
    version = str(version)
    run = client.get_run(run_id)
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("val_", "eval_"))}
    for key in [k for k in metrics if k.startswith("val_")]:  # the best epoch, not the last
        history = client.get_metric_history(run_id, key)
        metrics[key] = max(m.value for m in history) if history else metrics[key]
    text = description or (
        f"Weights {digest[:12]} of run {run.info.run_name} ({run_id}). Input: float32 (N, 1, H, W) grey slices as "
        "images are read, any N, H, W and intensity range; output: uint8 (N, 1, H, W) tumour masks from the bundle's "
        "own inference (sliding window, flip TTA, presence gate, box fit)."
    )
    client.update_model_version(registered_model_name, version, description=text)
    tags = {"checkpoint_sha256": digest, **{k: f"{v:.4f}" for k, v in metrics.items()}}
    for key in ("datalist_sha256", "train_dataset_0_digest", "validation_dataset_0_digest", "evaluation_dataset_0_digest"):
        if key in run.data.params:
            tags[f"data.{key}"] = run.data.params[key]
    for key, value in tags.items():
        client.set_model_version_tag(registered_model_name, version, key, value)
    shipped = bundle / "models" / "model.pt"
    if shipped.is_file() and file_digest(shipped, None) == digest:
        client.set_registered_model_alias(registered_model_name, "shipped", version)
    return version
