"""The training recipe: every stage of the shipped model, in order, from one command.

``python -m monai.bundle run training`` (train.yaml's ``training`` id) runs :class:`Recipe`:
each stage of ``recipe_stages`` is the bundle's own single-stage training (the ``run`` id) in a
process of its own, on the same command line plus the stage's config layer:

==============  ==========================  =================================================
stage           layer (after train.yaml)    what it trains
==============  ==========================  =================================================
segmentation    (none)                      the first stage from scratch, on the tumour slices
negatives       ``train_negatives.yaml``    the first stage's best weights fine-tuned with the
                                            datalist's tumour-free slices (``"tumour": 0``)
refiner         ``train_refiner.yaml``      the second stage, on windows around the true boxes
==============  ==========================  =================================================

Stage ``s`` writes into ``<ckpt_dir>/stages/<s>/`` (weights, ``last/``) and
``<output_dir>/stages/<s>/`` (``metrics.jsonl``, ``train.log``), and a ``done.json`` when it
finished. ``--resume true`` skips the stages that are done and resumes the first one that is not
at its last epoch. At the end the recipe publishes what it made, atomically:
``<ckpt_dir>/model.pt`` (the last first-stage weights: negatives, else segmentation) and
``<ckpt_dir>/refiner.pt``. With ``--tracking``, every stage is an MLflow run nested under one
parent run (``recipe_<time>``), which the parent's ``recipe.json`` names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tumorseg.io.files import file_digest, write_atomic

__all__ = ["STAGES", "Recipe", "stage_command"]

# stage: the config layer added after train.yaml (bundle-relative), the file it ships as
STAGES = {
    "segmentation": (None, "model.pt"),
    "negatives": ("configs/train_negatives.yaml", "model.pt"),
    "refiner": ("configs/train_refiner.yaml", "refiner.pt"),
}
# keys the recipe sets for each stage's process (a user's values of them are replaced)
_STAGE_KEYS = ("ckpt_dir", "output_dir", "resume", "recipe_run", "stage")


def _invocation(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The ``--config_file`` list and the other ``--key value`` pairs of a ``monai.bundle run``
    command line (``--key=value`` too), in order."""
    import ast

    words = argv[1:]
    if words and words[0] == "run":
        words = words[1:]
    if words and not words[0].startswith("--"):
        words = words[1:]  # the run id
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ValueError(f"unexpected argument {word!r}")
        if "=" in word:
            key, value = word[2:].split("=", 1)
            i += 1
        else:
            key, value = word[2:], words[i + 1] if i + 1 < len(words) else "true"
            i += 2
        pairs.append((key, value))
    files: list[str] = []
    for key, value in pairs:
        if key == "config_file":
            text = value.strip()
            listed = ast.literal_eval(text) if text.startswith("[") else text.split(",")
            files = [str(f).strip() for f in (listed if isinstance(listed, (list, tuple)) else [listed])]
    return files, [(k, v) for k, v in pairs if k not in ("config_file", "run_id")]


def stage_command(argv: list[str], stage: str, bundle_root: str, settings: dict[str, str]) -> list[str]:
    """The command line of one stage: the recipe's own (``argv``, a ``monai.bundle run training``
    command) with the ``run`` id, the stage's layer right after ``train.yaml`` and ``settings``."""
    files, pairs = _invocation(argv)
    layer = STAGES[stage][0]
    if layer is not None:
        at = next((i + 1 for i, f in enumerate(files) if Path(f).name == "train.yaml"), len(files))
        files = files[:at] + [str(Path(bundle_root) / layer)] + files[at:]
    command = [sys.executable, "-m", "monai.bundle", "run", "run", "--config_file", json.dumps(files)]
    for key, value in pairs:
        if key not in settings:
            command += [f"--{key}", value]
    for key, value in settings.items():
        command += [f"--{key}", value]
    return command


class Recipe:
    """Runs ``stages`` (names of :data:`STAGES`, in the order given) one process each.

    Args:
        stages: the stages to run, e.g. ``["segmentation", "negatives", "refiner"]``; a stage left
            out is switched off (the negatives stage left out: ``model.pt`` is the segmentation's).
        bundle_root: the bundle (for the stage layers).
        ckpt_dir: where the stages' folders go and the shipped files are published.
        output_dir: where the stages' logs and metrics go.
        resume: skip the stages that are done, resume the current one.
        argv: the invoking command line (default ``sys.argv``: ``python -m monai.bundle run training ...``).
    """

    def __init__(self, stages, bundle_root: str, ckpt_dir: str, output_dir: str, resume: bool = False, argv=None):
        stages = [stages] if isinstance(stages, str) else list(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise SystemExit(f"error: recipe_stages {stages}: each must be one of {list(STAGES)}")
        self.stages = [s for s in STAGES if s in stages]  # always in the recipe's order
        self.bundle_root = str(bundle_root)
        self.ckpt_dir = Path(ckpt_dir)
        self.output_dir = Path(output_dir)
        self.resume = bool(resume)
        self.argv = list(sys.argv if argv is None else argv)

    def _folder(self, stage: str) -> Path:
        return self.ckpt_dir / "stages" / stage

    def _parent_run_name(self) -> str:
        record = self.ckpt_dir / "stages" / "recipe_run_name"
        if self.resume and record.is_file():
            return record.read_text().strip()
        name = f"recipe_{time.strftime('%Y%m%d_%H%M%S')}_{os.urandom(2).hex()}"
        record.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(record, name.encode())
        return name

    def run(self) -> dict:
        if Path(self.argv[0]).parent.name != "bundle":
            raise SystemExit(
                "error: the training recipe runs through the bundle's command line: "
                "python -m monai.bundle run training --bundle_root <bundle> --config_file ..."
            )
        parent = self._parent_run_name()
        record: dict = {"recipe_run": parent, "stages": {}}
        for stage in self.stages:
            folder, logs = self._folder(stage), self.output_dir / "stages" / stage
            done = folder / "done.json"
            if self.resume and done.is_file():
                print(f"recipe: {stage} is done ({done}), skipped", flush=True)
                record["stages"][stage] = json.loads(done.read_text())
                continue
            done.unlink(missing_ok=True)
            resuming = self.resume and any((folder / "last").glob("*.pt"))
            settings = {
                "ckpt_dir": str(folder),
                "output_dir": str(logs),
                "resume": str(resuming).lower(),
                "recipe_run": parent,
                "stage": stage,
            }
            command = stage_command(self.argv, stage, self.bundle_root, settings)
            logs.mkdir(parents=True, exist_ok=True)
            print(f"recipe: {stage} {'resumed' if resuming else 'started'} (log: {logs / 'train.log'})", flush=True)
            start = time.time()
            with open(logs / "train.log", "a") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            if code != 0:
                self._mark_failed(folder)
                tail = (logs / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
                reason = tail[0].removeprefix("error: ")
                raise SystemExit(f"error: recipe stage {stage} failed (exit {code}): {reason} (log: {logs / 'train.log'})")
            weights = folder / "model.pt"
            if not weights.is_file():  # the best-model saver writes at a validation
                raise SystemExit(f"error: recipe stage {stage} wrote no {weights} (no validation: val_interval > max_epochs?)")
            result = {
                "stage": stage,
                "weights": str(weights),
                "sha256": file_digest(weights, None),
                "wall_s": round(time.time() - start, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_atomic(done, json.dumps(result, indent=1).encode())
            record["stages"][stage] = result
            print(f"recipe: {stage} done in {result['wall_s']} s", flush=True)
        record["published"] = self._publish(record["stages"])
        write_atomic(self.ckpt_dir / "stages" / "recipe.json", json.dumps(record, indent=1).encode())
        self._finish_parent_run(parent, record)
        return record

    def _publish(self, stages: dict) -> dict:
        published = {}
        for stage in stages:  # in the recipe's order: negatives' model.pt after segmentation's
            target = self.ckpt_dir / STAGES[stage][1]
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(stages[stage]["weights"], tmp)
            os.replace(tmp, target)
            published[target.name] = {"from": stage, "sha256": stages[stage]["sha256"]}
        for name, what in published.items():
            print(f"recipe: {self.ckpt_dir / name} <- {what['from']} ({what['sha256'][:12]})", flush=True)
        return published

    def _mark_failed(self, folder: Path) -> None:
        """A stage that failed: its MLflow run, and the parent's, end FAILED rather than stay
        RUNNING (a stage that dies in an exception ends its own run FAILED through the bundle's
        exception hook; one killed by a signal cannot, and the parent is the recipe's to end);
        ``--resume true`` reopens both."""
        where, named = self.ckpt_dir / "stages" / "recipe_run.json", folder / "last" / "mlflow_run_name"
        if not where.is_file():
            return
        from mlflow import MlflowClient

        info = json.loads(where.read_text())
        client = MlflowClient(info["tracking_uri"])
        runs = [info["run_id"]]
        if named.is_file():
            experiment = client.get_run(info["run_id"]).info.experiment_id
            name = named.read_text().strip()
            runs += [r.info.run_id for r in client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")]
        for run_id in runs:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "FAILED")

    def _finish_parent_run(self, parent: str, record: dict) -> None:
        """End the parent MLflow run the stages nested under (it exists only with --tracking)."""
        where = self.ckpt_dir / "stages" / "recipe_run.json"  # written by the first stage's tracker
        if not where.is_file():
            return
        from mlflow import MlflowClient

        info = json.loads(where.read_text())
        client = MlflowClient(info["tracking_uri"])
        for name, what in record["published"].items():
            client.set_tag(info["run_id"], f"published.{name}", f"{what['from']} {what['sha256']}")
        if "recipe.stages" not in client.get_run(info["run_id"]).data.params:  # a resumed recipe logged it
            client.log_param(info["run_id"], "recipe.stages", ",".join(record["stages"]))
        client.set_terminated(info["run_id"], "FINISHED")
