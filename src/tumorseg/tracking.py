"""Experiment tracking: MONAI's ``MLFlowHandler`` extended with the files our handlers write.

The bundle's MLflow settings (``configs/mlflow.json``, given to ``--tracking``) put an
:class:`MLflowTracker` on the trainer, the validator and the evaluator instead of the plain
handler; everything else about runs, metrics and the store is MONAI's.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

__all__ = ["MLflowTracker", "file_digest", "run_name"]


def run_name(workflow: str) -> str:
    """A readable, sortable run name: ``<workflow>_<YYYYmmdd_HHMMSS>``."""
    return f"{workflow}_{time.strftime('%Y%m%d_%H%M%S')}"


def file_digest(path: str | Path, length: int = 16) -> str:
    """Short SHA-256 of a file (the datalist, say), to tell runs on different data apart."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:length]


def _joined(path: str) -> str:
    match = re.fullmatch(r"(.+) \+ '(/[^']+)'", path)
    return match.group(1) + match.group(2) if match and not Path(path).exists() else path


class MLflowTracker(MLFlowHandler):
    """``MLFlowHandler`` that also uploads the files other handlers register in
    ``engine.state.tracked_files`` (validation panels, evaluation reports) at the end of each
    epoch, and sets run tags.

    Args:
        tags: tags set on the run when it starts (bundle name, workflow, ...).
        kwargs: everything ``monai.handlers.MLFlowHandler`` takes.
    """

    def __init__(self, tags: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tags = {k: str(v) for k, v in (tags or {}).items()}

    def _parse_artifacts(self):
        # MONAI's patch_bundle_tracking builds save_execute_config by appending " + '/config_….json'"
        # to the raw output_dir; when output_dir was overridden with a plain path (no "$"), that
        # stays a literal string. Join it here so the executed config is still uploaded.
        self.artifacts = tuple(_joined(a) if isinstance(a, str) else a for a in self.artifacts)
        return super()._parse_artifacts()

    def start(self, engine: Engine) -> None:
        super().start(engine)
        for key, value in self.tags.items():
            self.client.set_tag(self.cur_run.info.run_id, key, value)

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
