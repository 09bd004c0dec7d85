"""`tumorseg-export` on real files: atomic replacement, refusals, files others wrote kept."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE, run_cli

NAME = BUNDLE.name
MANIFEST = ".tumorseg-export.json"


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` (``skip``: top-level-relative prefixes left out; Python's
    byte-code caches too)."""
    return {
        rel: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not (rel := path.relative_to(root).as_posix()).startswith(skip) and "__pycache__" not in rel
    }


def bundle_snapshot() -> dict[str, str]:
    return snapshot(BUNDLE, skip=("eval/", "models/last/"))  # git-ignored outputs training may write


def export_cli(out: Path, *args: str):
    return run_cli("-m", "tumorseg.export.bundle_copy", str(out), *args, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def refused(result, *words: str):
    """Exit 1 and a single ``error: <path>: <problem>`` line, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def good_export(tmp_path_factory) -> Path:
    """One export made by the command; tests copy it (``previous``) before touching it."""
    out = tmp_path_factory.mktemp("good")
    ok(export_cli(out))
    return out / NAME


@pytest.fixture
def previous(good_export, tmp_path) -> Path:
    target = tmp_path / "out" / NAME
    shutil.copytree(good_export, target)
    return target


def test_export_then_reexport(tmp_path):
    out = tmp_path / "out"
    ok(export_cli(out, "--zip"))
    target = out / NAME
    files = snapshot(target)
    # a copy of the bundle, nothing rewritten; what its workflows write into it stays out
    assert {k: v for k, v in files.items() if k != MANIFEST} == bundle_snapshot()
    for rel in ("configs/common.yaml", "configs/inference.yaml", "configs/metadata.json"):
        assert rel in files, rel
    assert not [rel for rel in files if rel.endswith(".py")]  # the code is the installed package, not a copy
    assert (target / "models" / "model.pt").read_bytes() == (BUNDLE / "models" / "model.pt").read_bytes()
    # the manifest lists exactly the files the export wrote, with their content
    manifest = json.loads((target / MANIFEST).read_text())["files"]
    assert manifest == {k: v for k, v in files.items() if k != MANIFEST}
    with zipfile.ZipFile(out / f"{NAME}.zip") as zf:
        assert {n for n in zf.namelist() if not n.endswith("/")} >= {f"{NAME}/{rel}" for rel in files}
    assert sorted(p.name for p in out.iterdir()) == [NAME, f"{NAME}.zip"]  # no temporary left

    again = ok(export_cli(out, "--zip"))
    assert "kept" not in again.stdout
    assert snapshot(target) == files  # idempotent
    assert sorted(p.name for p in out.iterdir()) == [NAME, f"{NAME}.zip"]


@pytest.mark.parametrize("out", [BUNDLE.parent, BUNDLE], ids=["bundle-parent", "bundle-itself"])
def test_export_onto_the_source_bundle_is_refused(out):
    before, listing = bundle_snapshot(), sorted(BUNDLE.parent.iterdir())
    refused(export_cli(out), "source bundle")
    assert bundle_snapshot() == before
    assert sorted(BUNDLE.parent.iterdir()) == listing
    assert not (BUNDLE / NAME).exists()


def small_unet_weights(path: Path) -> Path:
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), strides=(2,), num_res_units=1)
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["garbage", "other-architecture", "missing"])
def test_failed_export_leaves_the_previous_one_intact(previous, tmp_path, kind):
    checkpoint = tmp_path / "bad.pt"
    if kind == "garbage":
        checkpoint.write_bytes(b"\x80\x02not a checkpoint" * 100)
    elif kind == "other-architecture":
        small_unet_weights(checkpoint)
    before = snapshot(previous)
    line = refused(export_cli(previous.parent, "--checkpoint", str(checkpoint), "--zip"), str(checkpoint))
    if kind == "other-architecture":
        assert "network_def" in line
    assert snapshot(previous) == before
    assert [p.name for p in previous.parent.iterdir()] == [NAME]  # no temporary folder, no zip


def test_files_written_into_the_export_by_others_are_kept(previous):
    # as MONAI Label does: new weights beside the exported ones, and the exported ones retrained
    state = torch.load(previous / "models" / "model.pt", weights_only=True)
    torch.save(state, previous / "models" / "model_v2.pt")
    retrained = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(retrained, previous / "models" / "model.pt")
    (previous / "logs").mkdir()
    (previous / "logs" / "train.log").write_text("epoch 1\n")
    (previous / "sessions").mkdir()  # an empty folder
    ours = {rel: (previous / rel).read_bytes() for rel in ("models/model_v2.pt", "models/model.pt", "logs/train.log")}

    for _ in range(2):  # the kept files are not adopted by the manifest: kept again next time
        result = ok(export_cli(previous.parent))
        kept = [line for line in result.stdout.splitlines() if line.startswith("kept")]
        assert len(kept) == 1 and all(rel in kept[0] for rel in ours), result.stdout
        assert {rel: (previous / rel).read_bytes() for rel in ours} == ours
        assert (previous / "sessions").is_dir()
        manifest = json.loads((previous / MANIFEST).read_text())["files"]
        assert not set(ours) & set(manifest)
        assert "configs/inference.yaml" in manifest and (previous / "configs" / "inference.yaml").is_file()
        assert [p.name for p in previous.parent.iterdir()] == [NAME]


def test_a_training_checkpoint_gives_its_model(tmp_path):
    state = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    checkpoint = tmp_path / "checkpoint_epoch=3.pt"
    torch.save({"model": state, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, checkpoint)
    ok(export_cli(tmp_path / "out", "--checkpoint", str(checkpoint)))
    exported = torch.load(tmp_path / "out" / NAME / "models" / "model.pt", weights_only=True)
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)


def test_a_folder_not_made_by_the_export_is_refused_unless_empty(tmp_path):
    target = tmp_path / "out" / NAME
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    refused(export_cli(target.parent), str(target), "not made by tumorseg-export")
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in target.parent.iterdir()] == [NAME]

    (target / "notes.txt").unlink()
    ok(export_cli(target.parent))
    assert (target / MANIFEST).is_file()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    refused(export_cli(out), str(out), "existing file")
    assert out.read_text() == "a file"


def test_an_export_killed_at_any_moment_leaves_the_previous_one_whole(previous):
    """SIGKILL at several moments of a re-export: the target is always one complete export
    (the previous or the new one, the same content), never a mix or a partial one."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    before = snapshot(previous)
    for delay in (0.5, 1.5, 2.5, 3.5, 5.0):
        proc = subprocess.Popen([sys.executable, "-m", "tumorseg.export.bundle_copy", str(previous.parent)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert previous.is_dir(), f"killed after {delay} s: no export left"
        assert snapshot(previous) == before, f"killed after {delay} s: the export changed"
