"""Pixel sizes and their units, read from TIFF (ImageJ, OME-TIFF) and OME-Zarr metadata."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import Any

log = logging.getLogger(__name__)

#: Unit spellings found in ImageJ, OME and NGFF metadata, mapped to the NGFF (UDUNITS-2) names.
UNIT_NAMES = {
    **dict.fromkeys(("µm", "μm", "um", "micron", "microns", "micrometer", "micrometre", "\\u00b5m"), "micrometer"),
    **dict.fromkeys(("nm", "nanometer", "nanometre"), "nanometer"),
    **dict.fromkeys(("mm", "millimeter", "millimetre"), "millimeter"),
    **dict.fromkeys(("cm", "centimeter", "centimetre"), "centimeter"),
    **dict.fromkeys(("m", "meter", "metre"), "meter"),
    **dict.fromkeys(("å", "angstrom"), "angstrom"),
    **dict.fromkeys(("s", "sec", "second", "seconds"), "second"),
    **dict.fromkeys(("ms", "millisecond", "milliseconds"), "millisecond"),
    **dict.fromkeys(("min", "minute", "minutes"), "minute"),
    **dict.fromkeys(("h", "hr", "hour", "hours"), "hour"),
}


def ngff_unit(unit: Any) -> str | None:
    """The NGFF name of ``unit`` (``"µm"`` -> ``"micrometer"``), or None for unknown or missing units."""
    if not isinstance(unit, str) or not unit.strip():
        return None
    return UNIT_NAMES.get(unit.strip().lower())


def tiff_pixel_size(tif: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Pixel size and unit per axis letter (``"X"``, ``"Y"``, ``"Z"``, ``"T"``) of an open ``tifffile.TiffFile``.

    Read from OME-TIFF ``Pixels`` attributes (``PhysicalSizeX`` ..., units default to µm as
    the OME schema says) or from ImageJ files (``XResolution``/``YResolution`` in pixels per
    ``unit``, ``spacing`` for Z, ``finterval`` seconds for T). Other TIFFs give nothing:
    their resolution tags are usually a print resolution (72 dpi), not a pixel size.
    """
    scale: dict[str, float] = {}
    units: dict[str, str] = {}
    try:
        if tif.is_ome and tif.ome_metadata:
            pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels"))
            for letter in "XYZ":
                size = pixels.get(f"PhysicalSize{letter}")
                if size is not None and float(size) > 0:
                    scale[letter] = float(size)
                    unit = ngff_unit(pixels.get(f"PhysicalSize{letter}Unit", "µm"))
                    if unit:
                        units[letter] = unit
        elif tif.is_imagej:
            meta = tif.imagej_metadata or {}
            unit = ngff_unit(meta.get("unit"))
            tags = tif.pages.first.tags
            for letter, tag in (("X", "XResolution"), ("Y", "YResolution")):
                if tag in tags:
                    numerator, denominator = tags[tag].value
                    if numerator > 0 and denominator > 0 and unit:
                        scale[letter], units[letter] = denominator / numerator, unit
            if unit and float(meta.get("spacing", 0) or 0) > 0:
                scale["Z"], units["Z"] = float(meta["spacing"]), unit
            if float(meta.get("finterval", 0) or 0) > 0:
                scale["T"], units["T"] = float(meta["finterval"]), "second"
    except (ValueError, StopIteration, ET.ParseError, TypeError) as exc:
        log.debug("no pixel size in %s: %s", getattr(tif, "filename", "TIFF"), exc)
        return {}, {}
    return scale, units
