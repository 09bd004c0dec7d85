"""The exported bundle served by a real MONAI Label server (its own venv: `make monailabel-venv`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE, IN_CI, REPO, check, free_port, port_open, run_cli
from PIL import Image

ML_VENV = Path(os.environ.get("TUMORSEG_MONAILABEL_VENV", REPO / ".venv-monailabel"))
SAMPLE = REPO / "data" / "brain-tumor-coco-sample"
MODEL = "brain_tumor_mri_seg"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ML_VENV / "bin" / "monailabel").exists() and not IN_CI, reason="no MONAI Label venv (make monailabel-venv)"
    ),
]


def export_app(tmp_path: Path) -> Path:
    """The app folder as `make monailabel-app` builds it: main.py and the exported bundle."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "monailabel_app" / "main.py", app / "main.py")
    check(run_cli("-m", "tumorseg.export.bundle_copy", str(app / "model")))
    return app


@contextlib.contextmanager
def monai_label(app: Path, studies: Path, log_path: Path, env: dict | None = None):
    """A real server on a free local port, started as `make monailabel-serve` does (CORS open to
    the local origin only); yields its URL and stops its whole process group at the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{ML_VENV / 'bin'}:{os.environ['PATH']}", "TUMORSEG_CORS_ORIGINS": url, **(env or {})}
    for name in ("PYTHONPATH", "MONAI_LABEL_SESSION_PATH"):  # the app decides where sessions go
        env.pop(name, None)
    log = log_path.open("w")
    command = [str(ML_VENV / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--conf", "models", MODEL]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/info/", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its training/scoring subprocesses
        server.wait(timeout=30)
        log.close()
    deadline = time.time() + 10
    while port_open(port) and time.time() < deadline:
        time.sleep(0.2)
    assert not port_open(port)


def call(url: str, method: str = "GET", body=None, headers=None, files=None, timeout=120):
    """One request; JSON in and out (or multipart ``files``: {field: (filename, bytes)}).
    Returns (status, headers, parsed JSON or raw bytes)."""
    headers = dict(headers or {})
    data = None
    if files is not None:
        boundary = uuid.uuid4().hex
        parts = []
        for field, (filename, content) in files.items():
            disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
            parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    elif body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content = response.read()
            status, response_headers = response.status, response.headers
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url}: HTTP {e.code} {e.read()[:2000]!r}") from None
    is_json = response_headers.get("content-type", "").startswith("application/json")
    return status, response_headers, json.loads(content) if is_json else content


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_monai_label_infer_equals_the_bundle_inference(tmp_path):
    app, studies = export_app(tmp_path), tmp_path / "studies"
    bundle = app / "model" / MODEL
    # a copy: the configs are the repository's, byte for byte
    for name in ("common.yaml", "inference.yaml", "train.yaml"):
        assert (bundle / "configs" / name).read_bytes() == (BUNDLE / "configs" / name).read_bytes()

    image = sorted((SAMPLE / "test").glob("*.jpg"))[0]
    studies.mkdir()
    shutil.copy(image, studies / image.name)
    # the bundle's own inference, run from the export, outside the repository, in MONAI Label's
    # environment, which has tumorseg installed from its wheel (no copy of source files)
    configs = str([str(bundle / "configs" / "common.yaml"), str(bundle / "configs" / "inference.yaml")])
    command = [str(ML_VENV / "bin" / "python"), "-m", "monai.bundle", "run", "inference", "--config_file", configs,
               "--bundle_root", str(bundle), "--input_dir", str(studies), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    where = subprocess.run([str(ML_VENV / "bin" / "python"), "-c", "import tumorseg; print(tumorseg.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert "site-packages" in where.stdout and str(REPO / "src") not in where.stdout  # installed, not the source
    assert not list(bundle.rglob("*.py"))  # and the export carries no code
    expected = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_seg.png")) > 0
    assert expected.any()  # a tumour slice: the comparison below means something

    with monai_label(app, studies, tmp_path / "server.log") as url:
        _, headers, mask = call(f"{url}/infer/{MODEL}?image={image.stem}&output=image", "POST")
        assert headers["content-type"] == "image/png"
        (tmp_path / "ml_mask.png").write_bytes(mask)

    served = np.asarray(Image.open(tmp_path / "ml_mask.png"))
    assert served.shape == expected.shape and set(np.unique(served)) <= {0, 1}
    assert np.array_equal(served > 0, expected)  # the one predictor behind both


def test_monai_label_trains_versions_weights_and_picks_next_images(tmp_path, converted_sample):
    """Label 3 slices through the datastore API, train one short epoch through /train, then:
    /infer serves the new weights (the shipped ones untouched), /info shows train stats, the
    random, first and epistemic (MC dropout) strategies pick unlabeled images; CORS is closed to
    foreign origins and sessions go under the app."""
    app, studies = export_app(tmp_path), tmp_path / "studies"
    bundle = app / "model" / MODEL
    shipped = bundle / "models" / "model.pt"
    shipped_sha = sha256(shipped)
    assert shipped_sha == sha256(BUNDLE / "models" / "model.pt")
    studies.mkdir()
    labeled = sorted((SAMPLE / "train").glob("*.jpg"))[:3]
    unlabeled = sorted((SAMPLE / "test").glob("*.jpg"))[:3]
    for image in labeled + unlabeled:
        shutil.copy(image, studies / image.name)
    log_path = tmp_path / "server.log"

    # no automatic re-scoring subprocesses (MONAI Label's default): the test scores once, itself
    with monai_label(app, studies, log_path, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}) as url:
        _, _, info = call(f"{url}/info/")
        assert MODEL in info["trainers"] and info["train_stats"] == {MODEL: {}}
        assert {"random", "first", "epistemic"} <= set(info["strategies"]) and "epistemic" in info["scoring"]

        # CORS: the local origin only
        _, headers, _ = call(f"{url}/info/", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in headers
        _, headers, _ = call(f"{url}/info/", headers={"Origin": url})
        assert headers["access-control-allow-origin"] == url

        # a session (an uploaded image) goes under the app, not into ~/.cache
        _, _, session = call(f"{url}/session/", "PUT", files={"files": (unlabeled[0].name, unlabeled[0].read_bytes())})
        assert (app / "sessions" / session["session_id"]).is_dir()

        for image in labeled:
            label = converted_sample / "labels" / "train" / f"{image.stem}.png"
            assert np.asarray(Image.open(label)).any()
            call(
                f"{url}/datastore/label?image={image.stem}&tag=final",
                "PUT",
                files={"label": (label.name, label.read_bytes()), "params": (None, b"{}")},
            )
        _, _, datalist = call(f"{url}/datastore/?output=train")
        assert sorted(Path(d["image"]).stem for d in datalist) == [p.stem for p in labeled]

        # one epoch of the full-size network on 2 slices, validated on the third
        _, _, task = call(f"{url}/train/{MODEL}", "POST", {"max_epochs": 1, "device": "cpu"})
        deadline = time.time() + 300
        while task["status"] in ("SUBMITTED", "RUNNING") and time.time() < deadline:
            time.sleep(2)
            _, _, task = call(f"{url}/train/")
        assert task["status"] == "DONE", "\n".join(task.get("details", [])) + log_path.read_text()[-3000:]

        trained = bundle / "models" / "monailabel" / "model.pt"
        assert trained.is_file() and sha256(trained) != shipped_sha
        assert sha256(shipped) == shipped_sha  # the shipped weights, byte for byte
        _, _, info = call(f"{url}/info/")
        stats = info["train_stats"][MODEL]
        assert stats["epochs"] == 1 and 0 <= stats["best_metric"] <= 1
        assert (stats["train_images"], stats["val_images"]) == (2, 1)
        assert stats["weights"] == "models/monailabel/model.pt" and stats["sha256"] == sha256(trained)
        # MONAI Label's own answer to "which file does /infer load": the trained one
        _, _, model = call(f"{url}/model/info/{MODEL}")
        assert model["checksum"] == f"SHA256:{sha256(trained)}" and model["train_stats"] == stats

        image = unlabeled[0]
        _, headers, mask = call(f"{url}/infer/{MODEL}?image={image.stem}&output=image", "POST")
        assert headers["content-type"] == "image/png"
        (tmp_path / "mask.png").write_bytes(mask)
        served = np.asarray(Image.open(tmp_path / "mask.png"))
        assert served.shape == np.asarray(Image.open(image)).shape[:2] and set(np.unique(served)) <= {0, 1}
        assert f"Infer model path: {trained}" in log_path.read_text()

        # MC-dropout scoring of the unlabeled images, then each strategy picks one of them
        _, _, summary = call(f"{url}/scoring/epistemic?run_sync=true", "POST", {"device": "cpu"})
        assert summary["executed"] == len(unlabeled)
        entropy = {}
        for image in unlabeled:
            _, _, image_info = call(f"{url}/datastore/image/info?image={image.stem}")
            entropy[image.stem] = image_info["epistemic_entropy"]
        assert all(e > 0 for e in entropy.values())
        picks = {s: call(f"{url}/activelearning/{s}", "POST", {})[2]["id"] for s in ("random", "first", "epistemic")}
        assert picks["random"] in entropy
        assert picks["first"] == min(entropy)
        assert picks["epistemic"] == max(entropy, key=entropy.get)
