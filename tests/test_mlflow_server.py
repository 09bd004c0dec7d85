"""MLflow for a team: the bundle's own commands tracking to a real ``mlflow server`` with a
PostgreSQL backend store and proxied artifact storage, both started here on 127.0.0.1 and
stopped by their PIDs: train and evaluate through the http URI, the model registered and loaded
back as a pyfunc through it, and four runs logging at once.

PostgreSQL is Debian's (``apt-get install postgresql``); ``initdb``/``postgres`` refuse to run
as root, so as root they run as the ``postgres`` user the package creates. Outside CI a machine
without PostgreSQL skips these tests; under ``CI=true`` it fails them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE, IN_CI, QUICK, REPO, TRAIN, check, configs, free_port, port_open, run_cli

pytestmark = pytest.mark.slow

EXPERIMENT = "brain_tumor_mri_seg"  # configs/mlflow.json's experiment and registered model name


def _unavailable(reason: str):
    """Skip a test whose environment is missing, but fail it under CI: a broken set-up must not pass."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the PostgreSQL-backed MLflow server must be set up)")
    pytest.skip(reason)


def _postgres_bin() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: on PATH, else Debian's newest /usr/lib/postgresql/<v>/bin."""
    if shutil.which("initdb") and shutil.which("postgres"):
        return Path(shutil.which("initdb")).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0]))
    return Path(found[-1]).parent if found else None


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{what} not ready after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


def _stop(proc: subprocess.Popen, sig: int, port: int, what: str, group: bool) -> None:
    """Stop a server started in a session of its own by its PID: ``sig`` to its process group
    (``group``) or to the process alone (which then stops its children); then check that no
    process of the group is left and that its port is closed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError(f"{what} did not stop within 30 s of signal {sig}; killed") from None
    deadline = time.time() + 10
    while _group_alive(proc.pid):
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"processes of {what} (process group {proc.pid}) outlived it; killed")
        time.sleep(0.2)
    deadline = time.time() + 15
    while port_open(port) and time.time() < deadline:
        time.sleep(0.2)
    assert not port_open(port), f"port {port} still open after stopping {what}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Server:
    uri: str  # http://127.0.0.1:<port>
    artifacts: Path  # the server's --artifacts-destination
    backend_store_uri: str


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A fresh PostgreSQL cluster and an ``mlflow server`` on it with proxied artifacts, for this module."""
    bindir = _postgres_bin()
    if bindir is None:
        _unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    try:
        import psycopg  # SQLAlchemy 2.1 reaches postgresql:// through psycopg (3)
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[test]')")
    as_user: dict = {}
    if os.geteuid() == 0:  # initdb and postgres refuse root
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    work = tmp_path_factory.mktemp("mlflow-server")
    # the cluster and its socket live where the postgres user can reach (pytest's tmp is root-only)
    pg_root = Path(tempfile.mkdtemp(prefix="tumorseg-pg-", dir="/tmp" if as_user else None))
    if as_user:
        os.chown(pg_root, as_user["user"], as_user["group"])
    pg_port, port = free_port(), free_port()
    while port == pg_port:
        port = free_port()
    pg_log, server_log = work / "postgres.log", work / "mlflow-server.log"
    postgres = server = None
    try:
        with pg_log.open("w") as log:
            initdb = subprocess.run(
                [str(bindir / "initdb"), "-D", str(pg_root / "data"), "-U", "mlflow", "--auth=trust", "-E", "UTF8", "--no-locale",
                 "--no-sync"],
                cwd=pg_root, stdout=log, stderr=subprocess.STDOUT, timeout=120, **as_user,
            )  # fmt: skip
        assert initdb.returncode == 0, f"initdb failed:\n{pg_log.read_text()[-3000:]}"
        with pg_log.open("a") as log:
            postgres = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(pg_root / "data"), "-h", "127.0.0.1", "-p", str(pg_port), "-k", str(pg_root),
                 "-c", "fsync=off"],
                cwd=pg_root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user,
            )  # fmt: skip

        def connect(dbname):
            return psycopg.connect(
                host="127.0.0.1", port=pg_port, user="mlflow", dbname=dbname, connect_timeout=5, autocommit=True
            )

        def pg_ready():
            try:
                connect("postgres").close()
                return True
            except psycopg.OperationalError:
                return False

        _wait(pg_ready, postgres, pg_log, "postgres", 60)
        with connect("postgres") as conn:
            conn.execute("CREATE DATABASE mlflow")

        store = f"postgresql://mlflow@127.0.0.1:{pg_port}/mlflow"
        artifacts = work / "artifacts"
        with server_log.open("w") as log:
            server = subprocess.Popen(
                [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", store,
                 "--artifacts-destination", str(artifacts), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )  # fmt: skip

        def server_ready():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK"
            except OSError:
                return False

        _wait(server_ready, server, server_log, "mlflow server", 120)
        yield Server(uri=f"http://127.0.0.1:{port}", artifacts=artifacts, backend_store_uri=store)
    finally:
        if server is not None:
            try:  # the server serves from child processes (uvicorn): stop the group
                _stop(server, signal.SIGTERM, port, "mlflow server", group=True)
            finally:
                if postgres is not None:  # SIGINT to the postmaster: PostgreSQL's fast shutdown of all its processes
                    _stop(postgres, signal.SIGINT, pg_port, "postgres", group=False)
        elif postgres is not None:
            _stop(postgres, signal.SIGINT, pg_port, "postgres", group=False)
        shutil.rmtree(pg_root, ignore_errors=True)


def _runs(client, experiment_id: str, workflow: str, since: float):
    """The runs of ``workflow`` started after ``since`` (time.time()): this test's, whatever ran before on the server."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.workflow = '{workflow}' and attributes.start_time >= {int(since * 1000)}"
    )
    return sorted(found, key=lambda r: r.info.run_name)


def _tracking(server: Server, tracking_dir: Path, how: str = "argument") -> tuple[list[str], dict]:
    """The bundle's MLflow settings pointed at ``server``: by ``--tracking_uri`` or by ``MLFLOW_TRACKING_URI``."""
    args = ["--tracking", str(REPO / "configs" / "mlflow.json"), "--tracking_dir", str(tracking_dir)]
    if how == "argument":
        return [*args, "--tracking_uri", server.uri], {}
    return args, {"MLFLOW_TRACKING_URI": server.uri}


def _stored(server: Server, run, artifact: str) -> Path:
    """Where the server keeps a run's artifact (proxied: the run's artifact URI is mlflow-artifacts:/...)."""
    assert run.info.artifact_uri == f"mlflow-artifacts:/{run.info.experiment_id}/{run.info.run_id}/artifacts"
    return server.artifacts / run.info.experiment_id / run.info.run_id / "artifacts" / artifact


def test_train_evaluate_register_and_load_through_the_server(mlflow_server, converted_sample, tmp_path):
    import mlflow

    since = time.time()
    tracking, _ = _tracking(mlflow_server, tmp_path / "mlflow")
    common = ["--dataset_dir", str(converted_sample), "--ckpt_dir", str(tmp_path / "models"), *QUICK, *tracking]
    check(run_cli("-m", "monai.bundle", "run", "run", "--config_file", TRAIN, "--max_epochs", "1",
                  "--output_dir", str(tmp_path / "train"), *common))  # fmt: skip
    check(run_cli("-m", "monai.bundle", "run", "--config_file", configs("evaluate.yaml"), "--eval_list", "validation",
                  "--output_dir", str(tmp_path / "evaluate"), *common))  # fmt: skip
    assert not (tmp_path / "mlflow").exists(), "a local SQLite store was written instead of the server's"

    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # proxied by the server
    [train] = _runs(client, experiment.experiment_id, "train", since)
    [evaluate] = _runs(client, experiment.experiment_id, "evaluate", since)
    assert train.info.status == evaluate.info.status == "FINISHED"
    assert {"train_loss", "val_mean_dice"} <= set(train.data.metrics)
    assert len(client.get_metric_history(train.info.run_id, "train_loss")) >= 1
    assert train.data.params["max_epochs"] == "1" and "code.mlflow_version" in train.data.params
    assert {"eval_dice", "eval_poster_mean_iou"} <= set(evaluate.data.metrics)
    assert evaluate.data.tags["mlflow.parentRunId"] == train.info.run_id  # linked through the server's search

    # artifacts went through the server into its --artifacts-destination
    for run, artifact in ((train, "report/validation.html"), (evaluate, "evaluation/summary.json")):
        stored = _stored(mlflow_server, run, artifact)
        assert stored.is_file() and stored.stat().st_size > 0, stored
        assert artifact in {a.path for a in client.list_artifacts(run.info.run_id, str(Path(artifact).parent))}
    assert list(mlflow_server.artifacts.rglob("MLmodel")), "the logged model's files are not in the server's store"

    # registered, and loaded back as a pyfunc through the http URI
    [version] = [v for v in client.search_model_versions(f"name = '{EXPERIMENT}'") if v.run_id == train.info.run_id]
    latest = version.version
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}/{latest}")
        image = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
        predicted = model.predict(image)
    finally:
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI, which later subprocesses would inherit
    assert predicted.shape == image.shape and predicted.dtype == np.uint8  # a mask per slice


def test_four_trainings_log_at_once(mlflow_server, converted_sample, tmp_path):
    """Four 1-epoch trainings (with validation, each registering its model) started together, two
    pointed at the server by --tracking_uri and two by MLFLOW_TRACKING_URI: four complete runs."""
    import mlflow

    since = time.time()
    procs = []
    for i in range(4):
        tracking, env = _tracking(mlflow_server, tmp_path / f"mlflow_{i}", "argument" if i < 2 else "environment")
        # default run names: started in the same second, they must still be four runs (MONAI's handler
        # joins an unfinished run of the same name, so tracking.run_name adds a random suffix)
        args = ["-m", "monai.bundle", "run", "run", "--config_file", TRAIN, "--bundle_root", str(BUNDLE),
                "--dataset_dir", str(converted_sample), "--ckpt_dir", str(tmp_path / f"models_{i}"),
                "--output_dir", str(tmp_path / f"train_{i}"), "--max_epochs", "1",
                *QUICK, *tracking]  # fmt: skip
        full_env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONUNBUFFERED": "1", **env}
        with (tmp_path / f"log_{i}.txt").open("w") as log:  # a file, not a pipe: nothing blocks on a full pipe
            procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=log,
                                          stderr=subprocess.STDOUT))  # fmt: skip
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"log_{i}.txt").read_text()[-2000:] for i in range(4)]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(logs)
    assert not any((tmp_path / f"mlflow_{i}").exists() for i in range(4)), "a local SQLite store was written"

    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = _runs(client, experiment.experiment_id, "train", since)
    assert len(runs) == 4 and len({r.info.run_name for r in runs}) == 4
    # they logged at once: all four were running at one moment
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)
    versions = {v.run_id: v.version for v in client.search_model_versions(f"name = '{EXPERIMENT}'")}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"train_loss", "val_mean_dice"} <= set(run.data.metrics) and run.data.params["max_epochs"] == "1"
        assert _stored(mlflow_server, run, "report/validation.html").is_file()
        assert run.info.run_id in versions, f"{run.info.run_name}'s model was not registered"
    assert len({versions[r.info.run_id] for r in runs}) == 4  # four distinct versions, registered concurrently
