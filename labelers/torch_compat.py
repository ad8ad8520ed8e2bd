"""Let torchvision's pure-Python parts import on a CPU-only torch.

Why: the only torchvision wheel matching torch 2.13 on the registry is linked against CUDA. On the CPU
torch its compiled ops (``torchvision/_C.so``) fail to load, and ``import torchvision`` then dies in
``_meta_registrations`` with ``operator torchvision::nms does not exist``. transformers, diffusers,
open_clip and timm all import torchvision, so that one failure breaks the whole model stack.

What: :func:`install` registers a meta-path finder (cheap, imports nothing). The first time anything imports
``torchvision``, the finder tries to load ``_C.so`` exactly as torchvision would. Only if that fails does it
define the operator *schemas* torchvision registers fake kernels for, so the import succeeds; the ops stay
unimplemented (calling ``torchvision.ops.nms`` still raises), which is fine: prefmill uses only transforms.
On a normal install (matching CUDA or CPU wheels) ``_C.so`` loads and this does nothing.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import threading

# Schemas of the ops torchvision's _meta_registrations.py registers fake kernels for (from torchvision's C++ sources).
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
    "-> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

_lock = threading.Lock()
_patched = False
_library = None  # keeps the torch.library.Library alive: dropping it would unregister the schemas


def compiled_ops_load() -> bool:
    """True when torchvision's compiled extension loads against the installed torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # not installed: nothing to fix
    directory = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(directory) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if not candidates:
        return False
    try:
        torch.ops.load_library(os.path.join(directory, candidates[0]))
        return True
    except (OSError, ImportError):
        return False


def define_missing_schemas() -> bool:
    """Define torchvision's op schemas when its extension cannot load. Returns True when it patched."""
    global _patched, _library
    with _lock:
        if _patched:
            return True
        if compiled_ops_load():
            return False
        import torch

        _library = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_SCHEMAS:
            _library.define(schema)
        _patched = True
        return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`define_missing_schemas` once, just before torchvision is first imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFinder)]
        define_missing_schemas()
        return None  # let the normal finders import torchvision


def install() -> None:
    """Register the finder (idempotent; a no-op when torchvision is already imported)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` and restore the previous value (``None``: no change).

    Tiny models on a shared CPU are dominated by OpenMP synchronisation: measured on 2 busy cores, judging 8
    images took ~5-16 s with 2 threads and ~0.65 s with 1.
    """
    if not n:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
