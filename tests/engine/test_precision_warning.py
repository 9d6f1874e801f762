"""bf16 on a CPU that emulates it is named before training starts."""

import torch

from transferkit.engine.loop import precision_warning


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    warning = precision_warning("bf16", cpu)
    assert warning is not None and "emulated" in warning and "--precision fp32" in warning
    assert precision_warning("fp32", cpu) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert precision_warning("bf16", cpu) is None  # AVX-512 BF16 / AMX: bf16 is the faster choice there
    assert precision_warning("bf16", torch.device("meta")) is None  # not a CPU: autocast picks its own kernels
