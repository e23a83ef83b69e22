"""Which files: images found in folders, the names of their outputs, and the plan checked before any work."""

from __future__ import annotations

import fnmatch
import logging
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from biounet.errors import InputError
from biounet.io._images import IMAGE_SUFFIXES
from biounet.io._zarr import is_zarr

log = logging.getLogger(__name__)


#: TIFF inputs with more pixels than this are streamed (2**26: 8192 x 8192); the in-memory
#: path needs about 26 bytes per pixel for a 2-class model (docs/benchmarks.md).
STREAM_ABOVE_PIXELS = 2**26

#: What :func:`predict_files` can write for each input (``save``).
SAVE_KINDS = ("probabilities", "labels", "overlay", "objects")

#: The default output name template: ``x.tif`` gives ``x_probabilities.tif``, ``x_labels.tif``,
#: ``x_overlay.png``, ``x_objects.csv`` (``x_probabilities.ome.zarr`` when streamed).
OUTPUT_NAME = "{stem}_{kind}{ext}"

#: The placeholders of an output name template (see :func:`output_name`).
NAME_FIELDS = ("stem", "kind", "ext", "dir")

#: Names of files that earlier runs of biounet wrote with the default template; a folder given as
#: input skips them (lower-case :mod:`fnmatch` patterns).
PREVIOUS_OUTPUTS = ("*_probabilities.*", "*_labels.*", "*_overlay.png")

#: Output file formats: ``"auto"`` follows the input (OME-Zarr for Zarr inputs, else TIFF).
OutputFormat = Literal["auto", "tiff", "ome-zarr"]
OUTPUT_FORMATS = ("auto", "tiff", "ome-zarr")


# --------------------------------------------------------------------------------------------
# inputs: files and folders
# --------------------------------------------------------------------------------------------
def find_images(
    paths: Sequence[str | Path], pattern: str | None = None, recursive: bool = False, *, exclude: Path | None = None,
    name: str = OUTPUT_NAME,
) -> list[Path]:  # fmt: skip
    """The image files that ``paths`` name: files as given, folders expanded to the images in them.

    Parameters
    ----------
    paths : sequence of path
        Files, Zarr/OME-Zarr folders (images themselves, never looked into) and folders. A
        path that is not a folder (a missing file too), or a folder named like an image file
        (``stack.tif/``), is kept as it is: reading it reports what is wrong.
    pattern : str, optional
        Keep only the images of folders whose name matches this glob (``"*.tif"``,
        ``"*_dapi.*"``; :mod:`fnmatch`, case-insensitive). Files named directly are kept.
    recursive : bool
        Look into the subfolders of folders too (not into hidden ones, nor through symbolic
        links to folders).
    exclude : Path, optional
        A folder to skip with everything in it (:func:`predict_files` gives its output folder).
    name : str
        The output name template of the run (:func:`output_name`): files named like its outputs
        are skipped too (``"{stem}.seg{ext}"`` skips ``*.seg.tif``; a template whose file
        names are only ``{stem}{ext}`` adds nothing).

    Returns
    -------
    list of Path
        In the order of ``paths``, each folder's images sorted by their path in it; a file
        found twice is kept once.

    Notes
    -----
    A folder's images are its files of the types biounet reads (:data:`biounet.io.IMAGE_SUFFIXES`)
    and its Zarr folders, not hidden ones. Files that look like the outputs of an earlier run
    (:data:`PREVIOUS_OUTPUTS`: ``*_labels.*``, ``*_probabilities.*``, ``*_overlay.png``) are
    skipped and logged, so that segmenting a folder into a folder inside it again is safe.
    A folder with no image left raises one :class:`~biounet.errors.InputError` naming it and
    the pattern.
    """
    return [path for path, _ in find_inputs(paths, pattern, recursive, exclude, name)]


def find_inputs(
    paths: Sequence[str | Path], pattern: str | None, recursive: bool, exclude: Path | None, name: str = OUTPUT_NAME
) -> list[tuple[Path, str]]:
    """:func:`find_images`, with each image's folder relative to the folder it was found in ("." if none)."""
    skip = (*PREVIOUS_OUTPUTS, *_output_globs(check_name(name)))
    if pattern is not None and (not isinstance(pattern, str) or not pattern.strip()):
        raise InputError(f"pattern must be a non-empty glob such as '*.tif', got {pattern!r}", option="pattern")
    excluded = resolved(Path(exclude)) if exclude is not None else None
    found: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if not given.is_dir() or is_zarr(given) or given.suffix.lower() in IMAGE_SUFFIXES:
            found.append((given, "."))
            continue
        images, skipped = _scan(given, pattern, recursive, excluded, skip)
        if skipped:
            shown = ", ".join(p.relative_to(given).as_posix() for p in skipped[:3])
            log.info("%s: skipped %d earlier output(s) of biounet (%s%s)", given, len(skipped), shown,
                     ", ..." if len(skipped) > 3 else "")  # fmt: skip
        if not images:
            matching = f" matching {pattern!r}" if pattern else ""
            where = " in it or its subfolders" if recursive else " in it" + ("" if pattern else " (subfolders: recursive)")
            besides = f"; {len(skipped)} earlier output(s) of biounet skipped" if skipped else ""
            raise InputError(f"{given}: a folder with no image files{matching}{where}; biounet reads "
                             f"{', '.join(IMAGE_SUFFIXES)} files and Zarr/OME-Zarr folders{besides}",
                             option="pattern" if pattern else None)  # fmt: skip
        log.info("%s: %d image(s)%s", given, len(images), f" matching {pattern!r}" if pattern else "")
        found += [(p, p.parent.relative_to(given).as_posix()) for p in images]
    unique: dict[Path, tuple[Path, str]] = {}
    for path, folder in found:
        key = resolved(path) if path.exists() else path
        if key in unique:
            log.debug("%s: given twice (as %s); segmented once", path, unique[key][0])
            continue
        unique[key] = (path, folder)
    return list(unique.values())


def _output_globs(name: str) -> tuple[str, ...]:
    """Lower-case globs of the file names that template ``name`` gives, where they say more than ``*{ext}``."""
    globs = set()
    for kind, ext in (("probabilities", ".tif"), ("labels", ".tif"), ("overlay", ".png"), ("probabilities", ".ome.zarr"),
                      ("labels", ".ome.zarr")):  # fmt: skip
        glob = Path(name.format(stem="*", kind=kind, ext=ext, dir="*")).name.lower()
        if glob.replace("*", "") != ext:
            globs.add(glob)
    return tuple(sorted(globs))


def _scan(
    folder: Path, pattern: str | None, recursive: bool, excluded: Path | None, skip: Sequence[str]
) -> tuple[list[Path], list[Path]]:
    """The images of ``folder`` (and its subfolders if ``recursive``) and the earlier outputs skipped."""
    images: list[Path] = []
    skipped: list[Path] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder: {exc.strerror or exc}") from exc
    for entry in entries:
        if entry.name.startswith("."):
            continue
        zarr_image = is_zarr(entry)
        if entry.is_dir() and not zarr_image:
            if recursive and excluded is not None and resolved(entry) == excluded:
                log.info("%s: skipped (the output folder)", entry)
            elif recursive and not entry.is_symlink():
                more, passed = _scan(entry, pattern, recursive, excluded, skip)
                images += more
                skipped += passed
            continue
        if not zarr_image and not (entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES):
            continue
        name = entry.name.lower()
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern.lower()):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            skipped.append(entry)
            continue
        images.append(entry)
    return sorted(images, key=lambda p: p.relative_to(folder).parts), skipped


# --------------------------------------------------------------------------------------------
# outputs: names and the plan
# --------------------------------------------------------------------------------------------
def check_name(name: str) -> str:
    """Check an output name template (see :func:`output_name`); return it.

    Raises one :class:`~biounet.errors.InputError` (``option="name"``) for an unknown or
    formatted placeholder, a template that does not end with ``{ext}``, or one that is not
    a relative path inside the output folder.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"name must be a template such as {OUTPUT_NAME!r}, got {name!r}", option="name")
    try:
        parsed = list(string.Formatter().parse(name))
    except ValueError as exc:
        raise InputError(f"name {name!r}: {exc} (write {{{{ and }}}} for literal braces)", option="name") from None
    fields = [(f, spec, conv) for _, f, spec, conv in parsed if f is not None]
    unknown = sorted({f for f, _, _ in fields if f not in NAME_FIELDS})
    if unknown:
        raise InputError(f"name {name!r}: unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; "
                         f"known: {', '.join('{' + f + '}' for f in NAME_FIELDS)}", option="name")  # fmt: skip
    if any(spec or conv for _, spec, conv in fields):
        raise InputError(f"name {name!r}: placeholders take no format or conversion", option="name")
    if not name.endswith("{ext}"):
        raise InputError(f"name {name!r} must end with {{ext}}: biounet chooses the file type of each output "
                         "(.tif, .png, .csv, .ome.zarr)", option="name")  # fmt: skip
    output_name(name, stem="x", kind="labels", ext=".tif", folder=".")
    return name


def output_name(name: str, *, stem: str, kind: str, ext: str, folder: str = ".") -> Path:
    """One output's path relative to the output folder, from the template ``name``.

    Placeholders: ``{stem}`` the input's name without its suffix (:func:`output_stem`);
    ``{kind}`` the output: ``probabilities``, ``labels``, ``overlay`` or ``objects``;
    ``{ext}`` its file type, with the dot: ``.tif``, ``.png``, ``.csv``, ``.ome.zarr``
    (streamed); ``{dir}`` the input's folder relative to the folder it was found in
    (:func:`find_images`; ``.`` for files named directly and at the top of that folder), so
    that ``"{dir}/{stem}_{kind}{ext}"`` mirrors the subfolders of a recursive search.
    A ``/`` makes subfolders of the output folder (``"{kind}/{stem}{ext}"``).
    """
    relative = Path(name.format(stem=stem, kind=kind, ext=ext, dir=folder))
    if relative.is_absolute() or ".." in relative.parts or not relative.name or relative.name.startswith("."):
        raise InputError(f"name {name!r} gives {relative.as_posix()!r} for {stem}: an output must be a visible "
                         "file inside the output folder", option="name")  # fmt: skip
    return relative


def output_stem(path: Path) -> str:
    """The name an input's outputs start with: the file name without its suffix (``.ome.zarr`` counts as one)."""
    return path.name.removesuffix(".zarr").removesuffix(".ome") if is_zarr(path) else path.stem


def resolved(path: Path) -> Path:
    """``path.resolve()``, with a symlink loop as an :class:`~biounet.errors.InputError`."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InputError(f"{path}: cannot be resolved ({exc})") from None


@dataclass(frozen=True)
class Targets:
    """What :func:`predict_files` writes for one input.

    Attributes
    ----------
    paths : dict of str to Path
        One output file (or OME-Zarr folder) per kind: ``probabilities``, ``labels``,
        ``overlay``, ``objects``. OME-Zarr labels live in the probabilities' ``labels/``
        group, so ``labels`` is a path of its own there only without probabilities.
    format : {"tiff", "ome-zarr"}
        The file format of the probabilities and labels.
    streamed : bool
        Whether the input is predicted chunk by chunk (Zarr inputs, TIFFs over
        :data:`STREAM_ABOVE_PIXELS`, or streaming asked for).
    """

    paths: dict[str, Path]
    format: Literal["tiff", "ome-zarr"]
    streamed: bool


def output_format_of(path: Path, output_format: OutputFormat) -> Literal["tiff", "ome-zarr"]:
    """The format of an input's outputs: ``output_format``, or for ``"auto"`` the input's own (TIFF for PNG etc.)."""
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}",
                         option="output_format")  # fmt: skip
    if output_format != "auto":
        return output_format
    return "ome-zarr" if is_zarr(path) else "tiff"


def plan_outputs(
    inputs: Sequence[Path], output: Path, save: Sequence[str], *, stream: bool = False, overwrite: bool = False,
    name: str = OUTPUT_NAME, folders: Mapping[Path, str] | None = None, output_format: OutputFormat = "auto",
) -> dict[Path, list[Path]]:  # fmt: skip
    """The files :func:`predict_files` will write for each input; refuse any that would destroy data.

    Checked before any work, so that nothing is written when one name is wrong. Raises a
    :class:`ValueError` naming both paths when an output would be an input of the call, when
    two inputs (or two outputs of one input) would write the same file, or (unless
    ``overwrite``) when an output exists. ``name`` is the output name template
    (:func:`output_name`), ``folders`` each input's ``{dir}`` (``"."`` where not given),
    ``output_format`` as for :func:`output_format_of`. OME-Zarr outputs hold the labels in
    the probabilities' ``labels/`` group, so their labels are a file of their own only
    without probabilities.
    """
    plan = plan_targets(list(map(Path, inputs)), output, save, stream=stream, overwrite=overwrite, name=name,
                        folders=folders or {}, output_format=output_format)  # fmt: skip
    return {path: list(targets.paths.values()) for path, targets in plan.items()}


def plan_targets(
    inputs: list[Path], output: Path, save: Sequence[str], *, stream: bool, overwrite: bool, name: str,
    folders: Mapping[Path, str], output_format: OutputFormat = "auto",
) -> dict[Path, Targets]:  # fmt: skip
    """:func:`plan_outputs` with the format and the streaming of each input (:class:`Targets`)."""
    check_name(name)
    planned: dict[Path, Targets] = {}
    owner: dict[Path, tuple[Path, str]] = {}
    sources = {resolved(p): p for p in inputs}
    for path in inputs:
        streamed = stream or is_zarr(path) or is_large_tiff(path)
        fmt = output_format_of(path, output_format)
        stem, folder = output_stem(path), folders.get(path, ".")
        kinds = {k: (".ome.zarr" if fmt == "ome-zarr" else ".tif") for k in ("probabilities", "labels") if k in save}
        if fmt == "ome-zarr" and "probabilities" in kinds:
            kinds.pop("labels", None)  # in the probabilities' labels/ group
        kinds |= {"overlay": ".png"} if "overlay" in save and not streamed else {}
        kinds |= {"objects": ".csv"} if "objects" in save else {}
        paths = {k: output / output_name(name, stem=stem, kind=k, ext=ext, folder=folder) for k, ext in kinds.items()}
        planned[path] = Targets(paths, fmt, streamed)
        for kind, target in paths.items():
            where = resolved(target)
            if where in sources:
                raise InputError(f"{path} would write {target}, which is an input of this call ({sources[where]}); "
                                 "choose another output folder")  # fmt: skip
            if where in owner:
                first, first_kind = owner[where]
                if first == path:
                    raise InputError(f"{path}: its {first_kind} and {kind} would both be written to {target}; put "
                                     f"{{kind}} in the name template ({name!r})", option="name")  # fmt: skip
                hint = " (or put {dir} in the name template)" if folders.get(first, ".") != folder else ""
                raise InputError(f"{first} and {path} would both be written to {target}: rename one of "
                                 f"them, or segment them into separate output folders{hint}")  # fmt: skip
            owner[where] = (path, kind)
            if target.exists() and not overwrite:
                raise InputError(f"{target} exists already (ground truth, or an earlier result?) and {path} would "
                                 "overwrite it; choose another output folder, or replace it with overwrite=True",
                                 option="overwrite")  # fmt: skip
    return planned


def is_large_tiff(path: Path) -> bool:
    """Whether ``path`` is a TIFF over :data:`STREAM_ABOVE_PIXELS` (unreadable files: no, the reader reports them)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.series) and math.prod(tif.series[0].shape) > STREAM_ABOVE_PIXELS
    except Exception:  # an unreadable file is reported by the in-memory reader
        return False


