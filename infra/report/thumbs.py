"""Small derived images for the review site: photo thumbnails and PAIR-X picture previews.

Pages never make the browser scale a full-size PNG: every ``<img>`` points at a JPEG made here,
sized for its slot, written under ``<OUT>/report/thumbs/``. Names hash the source and the
settings (for pictures, the pair's ``output_key`` too, since a re-explained pair rewrites its
PNG in place), so a rebuilt report reuses what exists and refreshes what changed.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from typing import Any

from PIL import Image

from pairx_core.render import PANELS_INFO_KEY

from ..decoded_photos import load_photo
from ..images import PICTURE_LONG_SIDE, decode_need
from ..storage import OutputLayout, StorageTarget
from .data import Photo

logger = logging.getLogger(__name__)

THUMBS_DIR = f"{OutputLayout.REPORT}/thumbs"
#: long side of photo thumbnails in pages, and of the enlarged photo a click opens
PHOTO_PX = 240
PHOTO_LARGE_PX = PICTURE_LONG_SIDE  # the decode policy's picture floor (infra.images.decode_need)
#: width of PAIR-X picture previews in candidate cards
PICTURE_PX = 480
JPEG_QUALITY = 85


def panels_only(picture: Image.Image) -> Image.Image:
    """The picture without its text strips, from its ``PANELS_INFO_KEY`` note (else whole)."""
    note = picture.info.get(PANELS_INFO_KEY)
    try:
        top, bottom = (int(v) for v in str(note).split(","))
    except ValueError:
        return picture
    if not 0 <= top < bottom <= picture.height:
        return picture
    return picture.crop((0, top, picture.width, bottom))


#: colour and width (in thumbnail pixels) of a detection's box drawn on its frame
BOX_COLOUR = (255, 40, 40)
BOX_WIDTH_PX = 3


def framed_photo(photo: Photo, storage_options: Mapping[str, Any] | None = None) -> Image.Image:
    """The whole upright photo with ``photo.box`` (pixels or fractions) drawn as a rectangle, its
    line about :data:`BOX_WIDTH_PX` wide in a :data:`PHOTO_PX` thumbnail."""
    from PIL import ImageDraw

    whole = load_photo(photo.uri, [(None, 0.0)], decode_need(), storage_options=storage_options).chip()
    image = whole.image.copy()
    if photo.box is not None:
        x, y, w, h = (float(v) for v in photo.box)
        if max(x, y, w, h) <= 1.0:  # fractions of the photo
            x, w, y, h = x * image.width, w * image.width, y * image.height, h * image.height
        else:  # full-resolution pixels of a photo decoded at 1 / decode_scale
            x, y, w, h = (v / whole.decode_scale for v in (x, y, w, h))
        width = max(1, round(BOX_WIDTH_PX * max(image.size) / PHOTO_PX))
        ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), outline=BOX_COLOUR, width=width)
    return image


class ThumbWriter:
    """Writes derived JPEGs once; remembers which exist (one listing per build)."""

    def __init__(self, out: str, storage_options: Mapping[str, Any] | None = None):
        self.storage = StorageTarget.from_url(out, storage_options)
        self.storage_options = storage_options
        self.existing = set(self.storage.list_dir(THUMBS_DIR))
        self.written = 0

    @staticmethod
    def _name(*parts: Any) -> str:
        return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:24] + ".jpg"

    def _put(self, name: str, image: Image.Image, long_side: int) -> str:
        image = image.convert("RGB")
        if max(image.size) > long_side:
            image.thumbnail((long_side, long_side), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        self.storage.write_bytes_atomic(f"{THUMBS_DIR}/{name}", buffer.getvalue())
        self.existing.add(name)
        self.written += 1
        return f"{THUMBS_DIR}/{name}"

    def photo(self, photo: Photo) -> tuple[str, str] | None:
        """``(thumbnail, enlarged)`` paths relative to OUT of a photo's chip; None if unreadable."""
        framed = ("framed",) if photo.framed else ()
        small = self._name("photo", photo.uri, photo.box, photo.theta, PHOTO_PX, *framed)
        large = self._name("photo", photo.uri, photo.box, photo.theta, PHOTO_LARGE_PX, *framed)
        if small in self.existing and large in self.existing:
            return f"{THUMBS_DIR}/{small}", f"{THUMBS_DIR}/{large}"
        try:
            if photo.framed:
                chip = framed_photo(photo, self.storage_options)
            else:
                chip = load_photo(photo.uri, [(photo.box, photo.theta)], decode_need(),
                                  storage_options=self.storage_options).chip(photo.box, photo.theta).image
        except Exception as error:  # noqa: BLE001 - a missing photo must not stop the report
            logger.warning("report: cannot read %s: %s", photo.uri, error)
            return None
        return self._put(small, chip.copy(), PHOTO_PX), self._put(large, chip, PHOTO_LARGE_PX)

    def picture(self, relative_png: str, output_key: str | None) -> str | None:
        """Preview path (relative to OUT) of the PAIR-X PNG at ``relative_png``; None if missing.

        The preview shows the picture's panels only: its label and caption strips, drawn for the
        full size, would shrink to unreadable text; the page prints names and metrics as text
        instead. Pictures without the panel note (written before it existed) are shown whole.
        """
        name = self._name("picture", relative_png, output_key, PICTURE_PX, "panels")
        if name in self.existing:
            return f"{THUMBS_DIR}/{name}"
        try:
            data = self.storage.read_bytes(relative_png)
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as error:  # noqa: BLE001
            logger.info("report: cannot read picture %s: %s", relative_png, error)
            return None
        return self._put_width(name, panels_only(image), PICTURE_PX)

    def _put_width(self, name: str, image: Image.Image, width: int) -> str:
        if image.width > width:
            image = image.convert("RGB").resize((width, max(1, round(image.height * width / image.width))),
                                                Image.LANCZOS)
        return self._put(name, image, max(image.size))
