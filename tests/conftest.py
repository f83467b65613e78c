"""Shared test setup.

- Without CUDA, Triton kernels run under the numpy interpreter: TRITON_INTERPRET=1 is set here before
  anything imports triton, so `backend="triton"` tests run on the CPU (small shapes, fp32/fp16; the interpreter
  cannot do bf16 `tl.dot`, bf16 atomics or libdevice, so bf16 kernel paths are tested on a GPU only).
- With CUDA, the compiled kernels run and the `gpu` tests are collected too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return DEVICE
