"""The one device / dtype resolver: one meaning of "auto", one-line errors for what a machine lacks."""

from __future__ import annotations

import pytest
import torch

from eve_vlm.runtime import DeviceError, resolve_device, resolve_dtype


def test_auto_device_is_cuda_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


def test_explicit_devices_pass_through():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_device_under_torchrun_is_the_local_rank_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    assert resolve_device("auto") == torch.device("cuda", torch.cuda.device_count() - 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_device_error(spec):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", ""])
def test_malformed_device_names(spec):
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(spec)


def test_auto_dtype_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype(None, "cpu") == torch.float32


@pytest.mark.parametrize(
    ("spec", "dtype"),
    [("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16),
     ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_explicit_dtypes_and_aliases(spec, dtype):
    assert resolve_dtype(spec, "cpu") == dtype


@pytest.mark.parametrize("spec", ["int8", "double", torch.int64])
def test_non_weight_dtypes_are_refused(spec):
    with pytest.raises(DeviceError):
        resolve_dtype(spec, "cpu")


def test_device_errors_are_value_errors():
    """So callers (and `eve`'s one-line error report) treat them as bad input."""
    assert issubclass(DeviceError, ValueError)
