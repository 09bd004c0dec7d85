"""Achieved FLOP/s of one training step against what this machine reaches on the same
convolutions alone: used by run_all.py.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions and
matrix products (forward and backward) and nothing else: normalisation, activations, the loss
and Adam cost time but no counted FLOPs, so the ratio says how far the whole step is from a
step made of these convolutions at the best speed the machine gives them.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Row, seconds_per_call
from benchmarks.training import fixed_batch_images_per_s


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_backward(network, loss_fn, image, label, autocast_dtype):
    def run():
        with torch.autocast(image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(network(image), label)
        loss.backward()

    return run


def conv_layers(network, image) -> Counter:
    """Every convolution the forward pass calls, as (layer, input shape, input needs grad),
    counted: equal layers on equal shapes are timed once."""
    seen = Counter()
    keys = {}

    def record(module, inputs, _output):
        x = inputs[0]
        key = (repr(module), tuple(x.shape), x.requires_grad)  # repr holds channels, kernel, stride, padding
        keys.setdefault(key, module)
        seen[key] += 1

    hooks = [
        m.register_forward_hook(record) for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    try:
        network(image)  # with autograd on, so the hooks see which inputs need a gradient
    finally:
        for h in hooks:
            h.remove()
    return Counter({(keys[k], k[1], k[2]): n for k, n in seen.items()})


def conv_alone(module, shape, needs_grad: bool, device, autocast_dtype):
    """Forward + backward of one convolution layer on a random input of the recorded shape."""
    conv = copy.deepcopy(module).to(device).train()
    x = torch.randn(shape, device=device, requires_grad=needs_grad)

    def run():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = conv(x)
        out.backward(torch.ones_like(out))

    return run


def matmul_flops_per_s(n: int, device, dtype, min_seconds: float) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, warmup=2, min_calls=3, min_seconds=min_seconds)


def flops_rows(
    template_network,
    loss_fn,
    learning_rate,
    image,
    label,
    device,
    autocast_dtype,
    *,
    iterations: int,
    min_seconds: float,
    matmul_size: int,
) -> list[Row]:
    network = copy.deepcopy(template_network).to(device).train()
    step_flops = counted_flops(forward_backward(network, loss_fn, image, label, autocast_dtype))
    # the step as trained: zero grads, forward, loss, backward, Adam
    step_seconds = image.shape[0] / fixed_batch_images_per_s(
        template_network, loss_fn, learning_rate, image, label, device, autocast_dtype=autocast_dtype, iterations=iterations
    )
    achieved = step_flops / step_seconds

    best, total_flops, total_seconds = 0.0, 0, 0.0
    layers = conv_layers(network, image)
    for (module, shape, needs_grad), count in layers.items():
        run = conv_alone(module, shape, needs_grad, device, autocast_dtype)
        flops = counted_flops(run)
        seconds = seconds_per_call(run, device, warmup=2, min_calls=3, min_seconds=min_seconds)
        best = max(best, flops / seconds)
        total_flops, total_seconds = total_flops + count * flops, total_seconds + count * seconds

    dtype = autocast_dtype or torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    matmul = matmul_flops_per_s(matmul_size, device, dtype, min_seconds)
    scale, unit = (1e12, "TFLOP/s") if device.type == "cuda" else (1e9, "GFLOP/s")
    where = f"{sum(layers.values())} conv calls, {len(layers)} distinct shapes"
    return [
        Row(
            "FLOP/s",
            "training step achieved (fwd+bwd+Adam)",
            achieved / scale,
            unit,
            achieved / best,
            f"÷ best conv layer; {step_flops / 1e9:.3g} GFLOP counted per step",
        ),
        Row(
            "FLOP/s",
            "network's convolutions alone, summed",
            total_flops / total_seconds / scale,
            unit,
            total_flops / total_seconds / best,
            f"÷ best conv layer; {where}",
        ),
        Row("FLOP/s", "best conv layer alone (ceiling)", best / scale, unit, 1.0, f"fwd+bwd, {dtype_name}"),
        Row(
            "FLOP/s",
            f"{matmul_size}x{matmul_size} matmul",
            matmul / scale,
            unit,
            matmul / best,
            f"÷ best conv layer; {dtype_name} reference",
        ),
    ]
