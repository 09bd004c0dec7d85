"""The bundle's network run by ONNX Runtime on the CPU, behind the ``nn.Module`` interface that
MONAI's inferers call (sliding window, flip TTA), so nothing else changes.

On CPU cores ONNX Runtime predicts faster than eager PyTorch (figures: ``benchmarks/README.md``),
with logits within 1e-4 of eager's (``tests/test_onnx_runtime.py``). The graph is exported once per set
of weights and network settings with ``torch.onnx.export`` (batch dimension dynamic, windows of the
training size) and kept in a cache folder (``TUMORSEG_CACHE``, default ``~/.cache/tumorseg``),
written atomically; a later run loads it in well under a second. Inference runs two such
sessions (the first stage and the second, ``tumorseg.postprocessing.refine.BoxRefined``); their threads sleep
between calls instead of spinning, which on 2 cores made each session's idle threads take the
other's time (the refinement cost 35 ms per tumour slice with spinning, 15 without).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def available() -> bool:
    """Whether ONNX Runtime and the exporter's packages are installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def resolve(runtime: str, device: torch.device) -> str:
    """``"onnx"`` or ``"torch"`` for a ``runtime`` setting (``"auto"``: ONNX Runtime on a CPU
    where it is installed); ValueError for anything else."""
    if runtime not in ("auto", "onnx", "torch"):
        raise ValueError(f"runtime must be auto, onnx or torch, not {runtime!r}")
    if runtime == "auto":
        return "onnx" if device.type == "cpu" and available() else "torch"
    return runtime


def cache_dir() -> Path:
    return Path(os.environ.get("TUMORSEG_CACHE") or Path.home() / ".cache" / "tumorseg") / "onnx"


class OnnxNetwork(torch.nn.Module):
    """``network`` (weights loaded, eval mode) exported to ONNX and run by ONNX Runtime's CPU
    provider; ``forward`` takes and returns float32 tensors of shape (N, 1, S, S), S = ``size``."""

    def __init__(self, network: torch.nn.Module, size: int, threads: int | None = None):
        super().__init__()
        import onnxruntime

        network = network.cpu().eval()
        digest = hashlib.sha256()
        for name, value in network.state_dict().items():
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digest.update(f"{network!r}|{size}|{torch.__version__}".encode())
        self.path = cache_dir() / f"{digest.hexdigest()[:32]}.onnx"
        if not self.path.is_file():
            self._export(network, size)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # two sessions share the cores
        self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _export(self, network: torch.nn.Module, size: int) -> None:
        import contextlib
        import io
        import logging
        import warnings

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        example = torch.zeros(2, 1, size, size)
        batch = torch.export.Dim("batch", min=1, max=4096)
        quiet = logging.getLogger("torch.onnx")  # it logs optional registrations (torchvision) as warnings
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
                warnings.simplefilter("ignore")
                torch.onnx.export(network, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                                  dynamic_shapes=({0: batch},), dynamo=True, verbose=False, external_data=False)  # fmt: skip
            os.replace(tmp, self.path)  # atomic: a concurrent run sees the whole file or none
        finally:
            quiet.setLevel(level)
            tmp.unlink(missing_ok=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
