"""Shared test setup.

- Without CUDA, Triton kernels run under the numpy interpreter: TRITON_INTERPRET=1 is set here before
  anything imports triton, so `backend="triton"` tests run on the CPU (small shapes, fp32/fp16; the interpreter
  cannot do bf16 `tl.dot`, bf16 atomics or libdevice, so bf16 kernel paths are tested on a GPU only).
- Interpreter shim (triton < 3.7, e.g. the 3.6 of torch 2.11): its interpreter hands integer kernel arguments
  over as 1-element numpy arrays and converts them with `int(array)`, which current numpy refuses ("only
  0-dimensional arrays can be converted to Python scalars"), so every loop over a runtime bound
  (`for k in range(K)`) fails there. `_interpreter_index_shim` makes `__index__` read the one element, as
  triton >= 3.7 does. Interpreter only; compiled kernels are untouched.
- With CUDA, the compiled kernels run and the `gpu` tests are collected too.
- Under pytest-xdist each worker takes its share of the cores as torch threads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_index_shim() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_uno_shim", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        # restored with the rest of the scope (last in, first out)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._uno_shim = True
    interpreter._patch_lang_tensor = patched


_interpreter_index_shim()

# under pytest-xdist, split the cores between the workers: each worker's default of one intra-op thread per
# core would oversubscribe the machine N-fold (2 workers x 2 threads on CI's 2 cores), and small ops then
# spend their time waiting on each other's threads
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

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
