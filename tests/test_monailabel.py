"""The exported bundle served by a real MONAI Label server (its own venv: `make monailabel-venv`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CI, QUICK, REPO, check, free_port, port_open, run_cli
from PIL import Image

ML_VENV = Path(os.environ.get("TUMORSEG_MONAILABEL_VENV", REPO / ".venv-monailabel"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (ML_VENV / "bin" / "monailabel").exists() and not IN_CI, reason="no MONAI Label venv (make monailabel-venv)"
    ),
]
NET = dict(zip(QUICK[0:8:2], QUICK[1:8:2]))  # the small network of the `trained` fixture


def test_monai_label_infer_equals_the_bundle_inference(trained, tmp_path):
    app, studies = tmp_path / "app", tmp_path / "studies"
    app.mkdir()
    shutil.copy(REPO / "monailabel_app" / "main.py", app / "main.py")
    sets = [a for k, v in NET.items() for a in ("--set", f"{k.lstrip('-')}={v.replace(' ', '')}")]
    check(run_cli("-m", "tumorseg.export", str(app / "model"), "--checkpoint", str(trained / "models" / "model.pt"), *sets))
    bundle = app / "model" / "brain_tumor_mri_seg"
    text = (bundle / "configs" / "inference.json").read_text()
    # the package's TTA inferer and box fit come from the bundle's own copy, never the installed package
    assert "scripts.tumorseg.inferers.FlipTTAInferer" in text and "scripts.tumorseg.transforms.ExpectedDiceBoxd" in text
    # expressions use `tumorseg.` only as the alias of that copy (`$import scripts.tumorseg as tumorseg`)
    assert not re.search(r'"_target_": "tumorseg\.|\$import tumorseg\b', text) and "scripts.tumorseg as tumorseg" in text

    image = sorted((REPO / "data" / "brain-tumor-coco-sample" / "test").glob("*.jpg"))[0]
    studies.mkdir()
    shutil.copy(image, studies / image.name)
    # the bundle's own inference, from the exported (flattened) config
    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(studies),
            "--output_dir",
            str(tmp_path / "bundle_out"),
        )
    )
    expected = np.asarray(Image.open(tmp_path / "bundle_out" / f"{image.stem}_seg.png")) > 0

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
