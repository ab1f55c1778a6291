"""JPEG decode and the model's resize / crop / normalise on the model actor's device.

Why: on a GPU the model embeds thousands of images a second, and decoding + resizing them on the
CPU (the read tasks' PIL path, ~1.2 ms a 256-px JPEG per core) would need several cores per GPU.
With ``embed.device_decode`` the read tasks ship the JPEG bytes untouched and the actor decodes a
whole chunk with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA) and resizes it
with torch ops on the same device. The code is device-agnostic: with ``device="cpu"`` the very same
path runs (libjpeg-turbo + torch's CPU kernels), which is how the tests exercise it.

Its pixels are close to, not equal to, the PIL path's (torch's antialiased bicubic resize is not
PIL's), which is why the resolved ``device_decode`` is part of the embed stage's fingerprint.

What the device does not take goes through the CPU path per sample, decided in the read task
(:func:`device_jpeg_size`: not a JPEG, a colour mode other than RGB/grey, no end-of-image marker),
and in the actor (a JPEG the device decoder rejects is decoded with PIL there; one PIL cannot
decode either is dropped and counted as ``undecodable_image``, as the CPU path would count it).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

# open_clip's eval resize modes this module reproduces: "shortest" (torchvision Resize of the
# shorter side + CenterCrop, for square sizes) and "squash" (Resize to (h, w)). "longest" pads, and
# a non-square "shortest" uses open_clip's own ResizeKeepRatio: those stay on the CPU path.
JPEG_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) converts exactly like PIL's convert("RGB")


def unsupported_reason(pp: dict[str, Any]) -> str | None:
    """Why the model's preprocessing (:func:`.model.preprocess_config`) cannot run on the device,
    or None when it can."""
    size = pp["size"] if isinstance(pp["size"], (list, tuple)) else [pp["size"], pp["size"]]
    mode = pp.get("resize_mode") or "shortest"
    if mode == "shortest" and size[0] != size[1]:
        return f"resize_mode 'shortest' with a non-square size {size}"
    if mode not in ("shortest", "squash"):
        return f"resize_mode {mode!r}"
    if (pp.get("interpolation") or "bicubic") not in ("bicubic", "bilinear", "random"):
        return f"interpolation {pp.get('interpolation')!r}"
    return None


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) when `data` is a JPEG the device path takes, from its header alone (no
    pixel is decoded); None sends the sample through the CPU path, which also classifies any
    defect (undecodable, too large) exactly as without device decode."""
    from PIL import Image

    # No end-of-image marker: truncated. The CPU path rejects it (PIL: "image file is truncated");
    # a GPU decoder might fill the rest in grey and keep it, so it never goes to the device.
    if b"\xff\xd9" not in data[-1024:]:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in JPEG_MODES:
                return None
            return image.size
    except Exception:  # noqa: BLE001 - anything PIL cannot even open: the CPU path counts it
        return None


class DevicePreprocessor:
    """JPEG bytes -> the model's input pixels (uint8 NCHW) on `device`."""

    def __init__(self, pp: dict[str, Any], device: str):
        import torch
        from torchvision.transforms import InterpolationMode

        reason = unsupported_reason(pp)
        if reason:
            raise ValueError(f"device preprocessing does not support {reason}")
        size = pp["size"] if isinstance(pp["size"], (list, tuple)) else [pp["size"], pp["size"]]
        self.size = (int(size[0]), int(size[1]))
        self.squash = (pp.get("resize_mode") or "shortest") == "squash"
        # open_clip maps everything but "bilinear" to bicubic at eval ("random" included)
        self.interpolation = (InterpolationMode.BILINEAR if pp.get("interpolation") == "bilinear"
                              else InterpolationMode.BICUBIC)
        self.device = torch.device(device)

    def decode(self, jpegs: list[bytes]) -> list[Any]:
        """Decoded CHW uint8 RGB tensors on the device, None where the decoder rejects the data.
        One batched call (nvJPEG decodes the batch together); if it fails, image by image, so one
        bad file costs only itself."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        # bytearray: a writable buffer (torch.frombuffer warns on bytes); decode_jpeg reads host memory
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        if not data:
            return []
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def resize_crop(self, image):
        """The model's resize and crop of one CHW uint8 image (torchvision's own output-size
        and crop-offset rules, as in the PIL path), uint8 out like the PIL path's."""
        from torchvision.transforms.v2 import functional as F

        if self.squash:
            return F.resize(image, list(self.size), interpolation=self.interpolation, antialias=True)
        image = F.resize(image, [self.size[0]], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, list(self.size))

    def __call__(self, jpegs: list[bytes], group: int = 64) -> tuple[Any, list[int]]:
        """(uint8 N'xCxHxW on the device, indices into `jpegs` that failed to decode). Decoded in
        groups of `group`, each resized before the next is decoded: full-size pictures (a 12-Mpx
        photo is 36 MB decoded) never pile up a whole batch's worth in device memory."""
        import torch

        failed, images = [], []
        for start in range(0, len(jpegs), group):
            for i, image in enumerate(self.decode(jpegs[start:start + group]), start):
                if image is None:
                    failed.append(i)
                else:
                    images.append(self.resize_crop(image))
        if not images:
            return torch.zeros((0, 3, *self.size), dtype=torch.uint8, device=self.device), failed
        return torch.stack(images), failed


def pixels_payload(pixels: np.ndarray) -> bytes:
    """A CPU-preprocessed uint8 HxWx3 image as the bytes a device-decode row carries."""
    return np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()


def payload_pixels(payload: bytes, size: tuple[int, int]) -> np.ndarray:
    return np.frombuffer(payload, dtype=np.uint8).reshape(size[0], size[1], 3)
