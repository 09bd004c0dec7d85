"""Experiment tracking: MONAI's ``MLFlowHandler`` extended for reviewing runs in the MLflow UI.

The bundle's MLflow settings (``configs/mlflow.json``, given to ``--tracking``) put an
:class:`MLflowTracker` on the trainer and the validator instead of the plain handler; runs,
metrics and the store stay MONAI's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

__all__ = [
    "MLflowTracker",
    "file_digest",
    "flatten_config",
    "run_name",
    "environment_params",
    "store_lock",
    "open_store",
    "training_run_id",
]

MAX_PARAM_VALUE = 500  # long expressions are cut: a parameter is for reading, the config file is an artifact


def run_name(workflow: str, record: str | None = None) -> str:
    """A readable, sortable run name ``<workflow>_<YYYYmmdd_HHMMSS>``, or, when resuming, the
    name kept in ``record`` by the interrupted run, so MLflow continues that run (MONAI's handler
    reuses an unfinished run of the same name) instead of starting an orphan."""
    if record and Path(record).is_file():
        return Path(record).read_text().strip()
    return f"{workflow}_{time.strftime('%Y%m%d_%H%M%S')}"


def file_digest(path: str | Path, length: int | None = 16) -> str:
    """SHA-256 of a file (the datalist, a checkpoint), cut to ``length`` hex digits."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:length]


def flatten_config(config: dict) -> dict[str, str]:
    """The scalar settings of a bundle config as ``{"train.dataloader.batch_size": "16", ...}``.

    A value that is a plain reference (``"@learning_rate"``) is replaced by what it refers to,
    so each parameter reads as the value the run used; expressions stay as written.
    """
    flat: dict[str, object] = {}

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list) and not all(isinstance(v, (int, float, str, bool)) or v is None for v in node):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        else:
            flat[key] = node

    walk({k: v for k, v in config.items() if k not in ("imports", "_meta_")}, "")
    by_id = {k.replace(".", "#"): v for k, v in flat.items()}
    out = {}
    for key, value in flat.items():
        for _ in range(5):  # follow chains of references
            if isinstance(value, str) and value.startswith("@") and value[1:] in by_id:
                value = by_id[value[1:]]
        text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
        out[key] = text[:MAX_PARAM_VALUE]
    return out


def environment_params(device=None) -> dict[str, str]:
    """Code and machine a run ran on: package versions, git commit, device, threads, world size."""
    import ignite
    import mlflow
    import monai
    import torch

    from . import __version__ as tumorseg_version

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
    """``(MlflowClient, experiment_id)`` of the store ``<tracking_dir>/mlruns.db``, creating the
    experiment with its artifacts beside the store (as ``configs/mlflow.json`` does)."""
    import mlflow
    from monai.utils import path_to_sqlite_uri

    root = Path(tracking_dir).resolve()
    uri = path_to_sqlite_uri(str(root / "mlruns.db"))
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found else client.create_experiment(experiment, artifact_location=(root / "mlruns").as_uri())
        )
    return client, experiment_id


def run_of_weights(tracking_dir, experiment: str, checkpoint, workflow: str, run_name: str):
    """``(client, run)``: a new run in the store of ``tracking_dir`` about one set of weights
    (an analysis such as the post-processing table or the presence check), tagged with the
    weights' SHA-256 and nested under the training run that produced them, where there is one."""
    client, experiment_id = open_store(tracking_dir, experiment)
    digest = file_digest(checkpoint, None)
    tags = {"workflow": workflow, "bundle": "brain_tumor_mri_seg", "checkpoint_sha256": digest}
    parent = training_run_id(client, experiment_id, digest)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client, client.create_run(experiment_id, tags=tags, run_name=run_name)


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

    - logs every scalar setting of the executed bundle config (``config_file``), the code and
      machine (:func:`environment_params`) as parameters, and sets ``tags``;
    - uploads, at the end of each epoch, the files other handlers register in
      ``engine.state.tracked_files`` (validation panels, reports);
    - at the end of training, logs the best checkpoint as an MLflow model (``mlflow.pytorch``,
      with an input example and signature), registers it as ``registered_model_name``, and
      tags the run with the checkpoint's SHA-256;
    - for an evaluation of ``source_checkpoint``, links the run to the training run that made
      that checkpoint (``mlflow.parentRunId``, so the UI nests it there, and ``trained_by_run``).

    Args:
        tags: tags set on the run when it starts.
        config_file: the executed config (MONAI's ``save_execute_config``), flattened into params.
        model: the network definition (an ``nn.Module``) to load ``checkpoint`` into and log.
        checkpoint: the best-model state dict written during training.
        registered_model_name: Model Registry name; None logs the model without registering it.
        input_shape: shape of the model's input example, e.g. ``[1, 1, 256, 256]``.
        source_checkpoint: for evaluation runs, the checkpoint being evaluated.
        run_record: file to keep the run's name in, for :func:`run_name` when resuming.
        kwargs: everything ``monai.handlers.MLFlowHandler`` takes.
    """

    def __init__(
        self,
        tags: dict | None = None,
        config_file: str | None = None,
        model=None,
        checkpoint: str | None = None,
        registered_model_name: str | None = None,
        input_shape: list[int] | None = None,
        source_checkpoint: str | None = None,
        run_record: str | None = None,
        **kwargs,
    ) -> None:
        self.store_uri = kwargs.get("tracking_uri")
        with store_lock(self.store_uri):  # MLflow opens (and may create) the store here
            super().__init__(**kwargs)
        self.run_record = run_record
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.config_file = _joined(config_file) if config_file else None
        self.model, self.checkpoint = model, checkpoint
        self.registered_model_name = registered_model_name
        self.input_shape = list(input_shape) if input_shape else None
        self.source_checkpoint = source_checkpoint
        self.artifacts = tuple(_joined(a) if isinstance(a, str) else a for a in self.artifacts)

    def start(self, engine: Engine) -> None:
        new_run = self.cur_run is None
        with store_lock(self.store_uri):  # the experiment may be created here
            super().start(engine)
        if not new_run:
            return
        run_id = self.cur_run.info.run_id
        if self.run_record:
            from .files import write_atomic

            write_atomic(self.run_record, self.cur_run.info.run_name.encode())
        for key, value in self.tags.items():
            self.client.set_tag(run_id, key, value)
        params = environment_params()
        if self.config_file and Path(self.config_file).is_file():
            config = json.loads(Path(self.config_file).read_text())
            params.update({f"config.{k}": v for k, v in flatten_config(config).items()})
        self._log_params_batched(params)
        if self.source_checkpoint and Path(self.source_checkpoint).is_file():
            self._link_to_training_run(run_id, file_digest(self.source_checkpoint, None))

    def _log_params_batched(self, params: dict) -> None:
        logged = self.client.get_run(self.cur_run.info.run_id).data.params
        todo = {k: v for k, v in params.items() if k not in logged}
        items = list(todo.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._log_params(dict(items[i : i + 100]))

    def _link_to_training_run(self, run_id: str, digest: str) -> None:
        self.client.set_tag(run_id, "checkpoint_sha256", digest)
        parent = training_run_id(self.client, self.experiment.experiment_id, digest)
        if parent:
            self.client.set_tag(run_id, "mlflow.parentRunId", parent)
            self.client.set_tag(run_id, "trained_by_run", parent)

    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        self.upload_registered(engine)

    def upload_registered(self, engine: Engine) -> None:
        files = getattr(engine.state, "tracked_files", None)
        if not files or self.cur_run is None:
            return
        while files:
            path, artifact_path = files.pop(0)
            if Path(path).is_file():
                self.client.log_artifact(self.cur_run.info.run_id, path, artifact_path)

    def complete(self) -> None:
        super().complete()
        if self.cur_run is not None and self.model is not None and self.checkpoint and Path(self.checkpoint).is_file():
            self.log_model()

    def log_model(self) -> None:
        """Log the best checkpoint as an MLflow model and register it (a new version per run)."""
        log_network(self.client, self.cur_run.info.run_id, self.model, self.checkpoint, self.registered_model_name,
                    self.input_shape)  # fmt: skip


def log_network(client, run_id: str, network, checkpoint, registered_model_name: str | None, input_shape=None) -> None:
    """Log ``checkpoint`` loaded into a copy of ``network`` as the run's MLflow model
    (``mlflow.pytorch``, with an input example) and register it as ``registered_model_name``;
    tag the run with the checkpoint's SHA-256. Used by training runs and by imported runs."""
    import copy

    import mlflow
    import monai
    import numpy as np
    import torch

    client.set_tag(run_id, "checkpoint_sha256", file_digest(checkpoint, None))
    net = copy.deepcopy(network).cpu().eval()
    net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    example = np.zeros(input_shape or [1, 1, 64, 64], dtype=np.float32)
    # the fluent API needs the global URI, which mlflow also puts into the environment (where
    # MONAI's handler would read it): restore both afterwards, unset if they were unset
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(
                net,
                name="model",
                input_example=example,
                registered_model_name=registered_model_name,
                # stated, not inferred: inference imports the model and takes long
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}"],
            )
    finally:
        mlflow.set_tracking_uri(previous_uri)
