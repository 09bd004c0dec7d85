"""The exported bundle served by a real MONAI Label server (its own venv: `make monailabel-venv`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE, IN_CI, REPO, check, free_port, port_open, run_cli
from PIL import Image

ML_VENV = Path(os.environ.get("TUMORSEG_MONAILABEL_VENV", REPO / ".venv-monailabel"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ML_VENV / "bin" / "monailabel").exists() and not IN_CI, reason="no MONAI Label venv (make monailabel-venv)"
    ),
]


def test_monai_label_infer_equals_the_bundle_inference(tmp_path):
    app, studies = tmp_path / "app", tmp_path / "studies"
    app.mkdir()
    shutil.copy(REPO / "monailabel_app" / "main.py", app / "main.py")
    check(run_cli("-m", "tumorseg.export", str(app / "model")))
    bundle = app / "model" / "brain_tumor_mri_seg"
    # a copy: the configs are the repository's, byte for byte
    for name in ("common.yaml", "inference.yaml", "train.yaml"):
        assert (bundle / "configs" / name).read_bytes() == (BUNDLE / "configs" / name).read_bytes()

    image = sorted((REPO / "data" / "brain-tumor-coco-sample" / "test").glob("*.jpg"))[0]
    studies.mkdir()
    shutil.copy(image, studies / image.name)
    # the bundle's own inference, run from the export, outside the repository
    configs = str([str(bundle / "configs" / "common.yaml"), str(bundle / "configs" / "inference.yaml")])
    check(
        run_cli(
            "-m", "monai.bundle", "run", "inference", "--config_file", configs, "--bundle_root", str(bundle),
            "--input_dir", str(studies), "--output_dir", str(tmp_path / "bundle_out"),
            cwd=tmp_path,
        )
    )  # fmt: skip
    expected = np.asarray(Image.open(tmp_path / "bundle_out" / f"{image.stem}_seg.png")) > 0
    assert expected.any()  # a tumour slice: the comparison below means something

    port = free_port()
    env = {**os.environ, "PATH": f"{ML_VENV / 'bin'}:{os.environ['PATH']}", "MONAI_LABEL_SESSION_PATH": str(tmp_path / "session")}
    env.pop("PYTHONPATH", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(ML_VENV / "bin" / "monailabel"),
            "start_server",
            "--app",
            str(app),
            "--studies",
            str(studies),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--conf",
            "models",
            "brain_tumor_mri_seg",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/infer/brain_tumor_mri_seg?image={image.stem}&output=image", method="POST"
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers["content-type"] == "image/png"
            (tmp_path / "ml_mask.png").write_bytes(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    deadline = time.time() + 10
    while port_open(port) and time.time() < deadline:
        time.sleep(0.2)
    assert not port_open(port)

    served = np.asarray(Image.open(tmp_path / "ml_mask.png"))
    assert served.shape == expected.shape and set(np.unique(served)) <= {0, 1}
    served = served > 0
    denominator = served.sum() + expected.sum()
    dice = 1.0 if denominator == 0 else 2 * (served & expected).sum() / denominator
    assert dice >= 0.99 and (served == expected).mean() > 0.999
