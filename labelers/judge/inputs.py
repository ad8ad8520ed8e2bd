"""What a judge reads besides its answers: the images of an item (decoded up front, so an unreadable one is that
item's ``image_error`` and never reaches the model) and the model reference (``zoo:<name>`` or a path / hub id).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labelers.judge.protocol import JudgeItem


def load_image(image: Any, what: str) -> tuple[Any | None, str | None]:
    """(RGB PIL image, None) or (None, reason). Accepts PIL images, paths and encoded bytes."""
    from PIL import Image

    if image is None:
        return None, f"missing {what}"
    if isinstance(image, BaseException):  # a loader's error handed over in place of the image
        return None, f"unreadable {what}: {type(image).__name__}: {image}"
    try:
        if isinstance(image, Image.Image):
            image.load()
            return image.convert("RGB"), None
        if isinstance(image, (bytes, bytearray)):
            import io

            with Image.open(io.BytesIO(image)) as im:
                return im.convert("RGB"), None
        if isinstance(image, (str, Path)):
            with Image.open(image) as im:
                return im.convert("RGB"), None
    except Exception as e:  # noqa: BLE001 - any decoding failure makes the item unjudgeable (reported as such)
        return None, f"unreadable {what}: {type(e).__name__}: {e}"
    return None, f"unsupported {what} type {type(image).__name__}"


def load_conditioning(task: str, source_image: Any, reference_images: Sequence[Any],
                      what: str = "item") -> tuple[Any | None, list[Any], str | None]:
    """Decode what a task conditions on: the edit source (``edit``) and the references (``multi_ref``).
    Returns (source, references, None) or (None, [], image error)."""
    source = None
    if task == "edit":
        source, err = load_image(source_image, "source image")
        if err:
            return None, [], err
    refs = []
    if task == "multi_ref":
        if not reference_images:
            return None, [], f"multi_ref {what} without reference images"
        for i, ref in enumerate(reference_images):
            img, err = load_image(ref, f"reference image {i}")
            if err:
                return None, [], err
            refs.append(img)
    return source, refs, None


def prepare_item(item: JudgeItem) -> tuple[JudgeItem | None, str | None]:
    """Decode every image of ``item``; returns (item with RGB PIL images, None) or (None, image error)."""
    image, err = load_image(item.image, "image")
    if err:
        return None, err
    source, refs, err = load_conditioning(item.task, item.source_image, item.reference_images)
    if err:
        return None, err
    return (
        JudgeItem(
            key=item.key,
            task=item.task,
            text=item.text,
            image=image,
            source_image=source,
            reference_images=tuple(refs),
            reference_types=tuple(item.reference_types),
        ),
        None,
    )

