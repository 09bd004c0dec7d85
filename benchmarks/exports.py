"""TorchScript and ONNX exports made by MONAI's own bundle CLI (`python -m monai.bundle
ckpt_export` / `onnx_export`), loaded back and compared with the eager network: used by run_all.py.

ONNX Runtime runs on its CPU provider everywhere (no onnxruntime-gpu is assumed), so it is
compared with the eager network on the CPU; TorchScript runs on the bundle's device.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import BUNDLE, REPO, Row, first_line, seconds_per_call
from tumorseg.bundle import config_files


def start_export(command: str, network_file: Path, weights: Path, image_size: int) -> subprocess.Popen:
    """Start the export command as a user would run it (the two exports run at once to save
    wall time; nothing is timed meanwhile)."""
    configs = BUNDLE / "configs"
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        command,
        "--net_id",
        "network_def",
        "--filepath",
        str(network_file),
        "--ckpt_file",
        str(weights),
        "--meta_file",
        str(configs / "metadata.json"),
        "--config_file",
        str(config_files("train", BUNDLE)),
        "--key_in_ckpt",
        "",
        # the dummy input the exporter traces with; ONNX keeps this shape fixed
        "--input_shape",
        f"[1, 1, {image_size}, {image_size}]",
    ]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_export(process: subprocess.Popen, command: str) -> None:
    """Raise with the last line of the command's output when it fails."""
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command} exited {process.returncode}: {output.strip().splitlines()[-1:]}")


def export_rows(
    template_network, weights: Path, image_size: int, device, tmp: Path, repeat: int, min_seconds: float
) -> list[Row]:
    files = {"ckpt_export": tmp / "model.ts", "onnx_export": tmp / "model.onnx"}
    running = {command: start_export(command, file, weights, image_size) for command, file in files.items()}
    failed = {}
    for command, process in running.items():  # both finish before any timing, so nothing competes with it
        try:
            wait_export(process, command)
        except Exception as e:  # report and go on: the other rows still hold
            failed[command] = first_line(e)

    cpu_network = copy.deepcopy(template_network).cpu().eval()
    cpu_network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    network = cpu_network if device.type == "cpu" else copy.deepcopy(cpu_network).to(device)
    slice_ = torch.rand(1, 1, image_size, image_size)
    on_device = slice_.to(device)

    def per_s(fn, dev=device):
        return 1 / seconds_per_call(fn, dev, min_calls=repeat, min_seconds=min_seconds)

    torch.set_grad_enabled(False)
    try:
        eager_out, eager_cpu_out = torch.sigmoid(network(on_device)).cpu(), torch.sigmoid(cpu_network(slice_))
        eager_rate = per_s(lambda: network(on_device))
        rows = [
            Row(
                "export",
                f"eager network ({device.type})",
                eager_rate,
                "slices/s",
                1.0,
                f"batch 1, {image_size}x{image_size}, fp32",
            )
        ]
        cpu_rate = eager_rate
        if device.type != "cpu":
            cpu_rate = per_s(lambda: cpu_network(slice_), torch.device("cpu"))
            rows.append(
                Row("export", "eager network (cpu)", cpu_rate, "slices/s", None, "reference for ONNX Runtime's CPU provider")
            )

        if "ckpt_export" in failed:
            rows.append(Row("export", "TorchScript (ckpt_export)", None, "slices/s", None, failed["ckpt_export"]))
        else:
            scripted = torch.jit.load(str(files["ckpt_export"]), map_location=device).eval()
            diff = (torch.sigmoid(scripted(on_device)).cpu() - eager_out).abs().max().item()
            rate = per_s(lambda: scripted(on_device))
            rows.append(
                Row(
                    "export",
                    f"TorchScript (ckpt_export, {device.type})",
                    rate,
                    "slices/s",
                    rate / eager_rate,
                    f"÷ eager; max abs diff of sigmoid {diff:.2e}",
                )
            )
    finally:
        torch.set_grad_enabled(True)

    if "onnx_export" in failed:
        rows.append(Row("export", "ONNX (onnx_export)", None, "slices/s", None, failed["onnx_export"]))
        return rows
    try:
        import onnxruntime
    except ImportError as e:
        rows.append(
            Row(
                "export",
                "ONNX (onnx_export) on ONNX Runtime",
                None,
                "slices/s",
                None,
                f"exported; not run: onnxruntime not importable ({e})",
            )
        )
        return rows
    try:
        session = onnxruntime.InferenceSession(str(files["onnx_export"]), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: slice_.numpy()}
        diff = (torch.sigmoid(torch.from_numpy(session.run(None, feed)[0])) - eager_cpu_out).abs().max().item()
        rate = per_s(lambda: session.run(None, feed), torch.device("cpu"))
        rows.append(
            Row(
                "export",
                f"ONNX (onnx_export) on ORT {onnxruntime.__version__} CPU",
                rate,
                "slices/s",
                rate / cpu_rate,
                f"÷ eager on cpu; max abs diff of sigmoid {diff:.2e}",
            )
        )
    except Exception as e:
        rows.append(Row("export", "ONNX (onnx_export) on ONNX Runtime CPU", None, "slices/s", None, first_line(e)))
    return rows
