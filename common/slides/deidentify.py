"""De-identification of a whole-slide file: a copy without label and macro images and
without the scanner metadata that can name a patient, operator or date.

TIFF-based slides are copied, then the copy is patched in place with struct-level edits,
as OpenSlide's anonymize-slide tool does (classic and BigTIFF, either byte order): label
and macro directories are unlinked from the IFD chain and their strips, values and the
directories themselves are zeroed; every kept directory's description is cut down to
the fields tiling needs and name, date and host tags are zeroed. Pyramid tiles are never
rewritten, so nothing is re-encoded and every tile keeps its bytes and offset. A DICOM
instance is rewritten by pydicom with its patient, study and specimen attributes emptied;
its PixelData element is written back as the bytes it was read as. The struct-level TIFF
editing lives in ``tiffpatch``, the DICOM attribute rules in ``deidentify_dicom``.

Afterwards the copy must open with the same levels and MPP, show no associated image but
a thumbnail, and no removed identifying value may appear anywhere in it (an orphaned
copy in unreferenced bytes is zeroed, one inside kept data refuses the file). Anything
that cannot be de-identified safely raises InvalidSlide and leaves no file at ``dst``."""

from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import openslide
import tifffile
import tiffslide
from pydicom.errors import InvalidDicomError

from hepato.common.exceptions import InvalidSlide
from hepato.common.slides.deidentify_dicom import deidentify_dicom
from hepato.common.slides.reader import open_slide
from hepato.common.slides.sniff import SlideFormat, sniff_slide
from hepato.common.slides.tiffpatch import POINTER_IFDS, Guard, Range, TiffPatch


@dataclass
class DeidentifyReport:
    """What was taken out: associated image kinds and field names, never their values."""

    removed_images: list[str] = field(default_factory=list)
    scrubbed_fields: list[str] = field(default_factory=list)


# Shorter values are too common to look for across a whole file without false alarms.
_MIN_NEEDLE = 6
_DESCRIPTION = 270
# Zeroed wherever they occur; those in _PERSONAL_TAGS are also searched for afterwards.
_BLANK_TAGS = {269: "DocumentName", 285: "PageName", 306: "DateTime", 315: "Artist"}
_BLANK_TAGS |= {316: "HostComputer", 700: "XMP", 33432: "Copyright", 33723: "IPTC"}
_BLANK_TAGS |= {34377: "Photoshop", 37510: "UserComment", 42016: "ImageUniqueID"}
_PERSONAL_TAGS = {269, 285, 306, 315, 316}
# ASCII tags kept as they are: they name the scanner and software, not a person.
_KEEP_ASCII = {270, 271, 272, 305}

_APERIO_KEEP = {"AppMag", "MPP", "StripeWidth", "Exposure Time", "Exposure Scale", "Gamma"}
_APERIO_KEEP |= {"Focus Offset", "Left", "Top", "LineAreaXOffset", "LineAreaYOffset"}
_APERIO_KEEP |= {"LineCameraSkew", "OriginalWidth", "OriginalHeight", "Filtered"}
_APERIO_KNOWN = {"Filename", "Date", "Time", "Time Zone", "User", "ScanScope ID", "Barcode"}
_APERIO_KNOWN |= {"DSR ID", "ImageID", "Rack", "Slide", "Title", "ICC Profile", "Parmset"}
_APERIO_KNOWN |= {"Session Mode", "Copyright"} | _APERIO_KEEP
_APERIO_PERSONAL = {"Filename", "Date", "Time", "User", "Barcode", "Title", "ScanScope ID"}
_APERIO_WORDS = {"Aperio", "Image", "Library", "Leica", "Biosystems", "GT450", "ImageScope"}
_APERIO_TOKEN = re.compile(
    r"v?\d+(\.\d+)*|[\[(]?\d+(,\d+)?(x\d+)?[\])]?|->?|[A-Z0-9]+/[A-Z0-9]+|[A-Z]=\d+"
)
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?([eE][+-]?\d+)?")
_TIFFFILE_SHAPE = re.compile(r'\{"shape": \[[\d, ]*\]\}')

# The OME-XML is rebuilt from these elements and attributes only; IDs are renumbered.
_OME_CHILDREN = {"OME": {"Image"}, "Image": {"Pixels"}}
_OME_CHILDREN["Pixels"] = {"Channel", "TiffData", "Plane", "MetadataOnly"}
_OME_ATTRS = {"Image": {"ID"}, "Channel": {"ID", "SamplesPerPixel", "Color"}}
_OME_ATTRS["Pixels"] = {"ID", "DimensionOrder", "Type", "SignificantBits", "Interleaved"}
_OME_ATTRS["Pixels"] |= {"BigEndian", "SizeX", "SizeY", "SizeZ", "SizeC", "SizeT"}
_OME_ATTRS["Pixels"] |= {f"PhysicalSize{a}{u}" for a in "XYZ" for u in ("", "Unit")}
_OME_ATTRS["TiffData"] = {"IFD", "FirstZ", "FirstC", "FirstT", "PlaneCount"}
_OME_ATTRS["Plane"] = {"TheZ", "TheC", "TheT", "DeltaT", "DeltaTUnit", "ExposureTime"}
_OME_ATTRS["Plane"] |= {f"Position{a}{u}" for a in "XYZ" for u in ("", "Unit")}
_OME_PERSONAL = {"Name", "FirstName", "LastName", "MiddleName", "Email", "UserName"}
_OME_PERSONAL |= {"Institution", "AcquisitionDate", "Description"}
# Damaged structures as the parsers report them; an OSError (disk, permissions) is not
# the slide's fault and propagates as it is.
_PARSE_ERRORS: tuple[type[Exception], ...] = (ValueError, LookupError, EOFError, struct.error)
_PARSE_ERRORS += (ET.ParseError, InvalidDicomError, openslide.OpenSlideError)
_SAFE_VALUE = re.compile(r"[\w.+-]{0,64}")
_ASSOCIATED = ("label", "macro", "overview", "thumbnail")


def deidentify_slide(src: Path, dst: Path) -> DeidentifyReport:
    """Write a de-identified copy of the slide ``src`` to ``dst`` (``src`` is left as it
    is; replacing the stored original is the caller's move). Raises InvalidSlide when the
    file cannot be de-identified safely; then nothing is left at ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise InvalidSlide("the de-identified copy must be written to a new path")
    fmt = sniff_slide(src).format
    if fmt is SlideFormat.HAMAMATSU_NDPI:
        raise InvalidSlide("de-identifying Hamamatsu NDPI slides is not supported")
    # Written under a temporary name and renamed when verified: a crash mid-way never
    # leaves a half-scrubbed file under the name callers look for.
    tmp = dst.with_name(f".{dst.name}.deidentify-partial")
    try:
        if fmt is SlideFormat.DICOM:
            fields, needles = deidentify_dicom(src, tmp)
            report = DeidentifyReport([], fields)
            _sweep(tmp, needles, [(0, os.path.getsize(tmp))])
        else:
            shutil.copyfile(src, tmp)
            with open(tmp, "r+b") as f:
                report, needles, protected = _deidentify_tiff(src, TiffPatch(f), fmt)
            _verify_tiff(src, tmp, fmt)
            _sweep(tmp, needles, protected)
        os.replace(tmp, dst)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
        if isinstance(e, InvalidSlide):
            raise
        if isinstance(e, _PARSE_ERRORS):
            # The type only: a parser's message may quote the very text being removed.
            what = type(e).__name__
            raise InvalidSlide(f"the {fmt.value} slide cannot be de-identified ({what})") from e
        raise
    return report


def _deidentify_tiff(
    src: Path, tiff: TiffPatch, fmt: SlideFormat
) -> tuple[DeidentifyReport, set[str], list[Range]]:
    report, needles = DeidentifyReport(), set[str]()
    with tifffile.TiffFile(src) as tf:
        vendor = next((v for v in ("scn", "philips", "bif", "qpi") if getattr(tf, f"is_{v}")), "")
        if vendor:
            raise InvalidSlide(f"de-identifying {vendor} TIFF slides is not supported")
        pages = [p for p in tf.pages if isinstance(p, tifffile.TiffPage)]
        removed = _associated_pages(tf, pages, fmt)
    main = tiff.main_chain()
    if main != [p.offset for p in pages]:
        raise InvalidSlide("the TIFF directory chain is not what tifffile reads")
    if main[0] in removed:
        raise InvalidSlide("the first TIFF directory is not the slide's first level")
    kept = [o for o in main if o not in removed]
    kept_all = [o for k in kept for o in tiff.tree(k)]
    scrubbed = set(_BLANK_TAGS) | {_DESCRIPTION} | set(POINTER_IFDS)
    protected: list[Range] = []
    for offset in kept_all:
        ascii_ = {e.code for e in tiff.ifd(offset)[0] if e.dtype == 2} - _KEEP_ASCII
        data, meta = tiff.ranges(offset, scrubbed | ascii_)
        protected += data + meta
    guard = Guard(protected)
    for offset in (o for r in removed for o in tiff.tree(r)):
        data, meta = tiff.ranges(offset)
        for pos, n in data + meta:
            guard.zero(tiff, pos, n)
    report.removed_images = [removed[o] for o in main if o in removed]
    # Relink the chain past the removed directories (IFD 0 is never one of them).
    for offset, nxt in zip(kept, [*kept[1:], 0], strict=True):
        tiff.put(tiff.wfmt, tiff.ifd(offset)[1], nxt)
    index_map = {main.index(o): i for i, o in enumerate(kept)}
    for i, offset in enumerate(kept_all):
        for e in tiff.ifd(offset)[0]:
            if e.code == _DESCRIPTION and e.dtype == 2:
                old = tiff.read(e.value_at, e.size).split(b"\0")[0].decode("utf-8", "replace")
                if fmt is SlideFormat.OME_TIFF and i == 0:
                    new = _scrub_ome(old, index_map, report, needles)
                else:
                    new = _new_description(old, fmt, report, needles)
                if new != old:
                    tiff.set_ascii(e, new.encode("utf-8"), guard)
            elif e.code in POINTER_IFDS:
                for pos, n in tiff.pointer_ifd(tiff.uints(e)[0]):
                    guard.zero(tiff, pos, n)
                report.scrubbed_fields.append(POINTER_IFDS[e.code])
            elif e.code in _BLANK_TAGS or (e.dtype == 2 and e.code not in _KEEP_ASCII):
                value = tiff.read(e.value_at, e.size)
                if not value.strip(b"\0"):
                    continue
                if e.code in _PERSONAL_TAGS:
                    needles.add(value.split(b"\0")[0].decode("latin-1"))
                if e.inline:  # inside the directory entry, which the guard protects
                    tiff.write(e.value_at, bytes(e.size))
                else:
                    guard.zero(tiff, e.value_at, e.size)
                report.scrubbed_fields.append(_BLANK_TAGS.get(e.code, f"tag {e.code}"))
    report.scrubbed_fields = sorted(set(report.scrubbed_fields))
    return report, needles, protected


def _associated_pages(
    tf: tifffile.TiffFile, pages: list[tifffile.TiffPage], fmt: SlideFormat
) -> dict[int, str]:
    """Main-chain IFD offset -> kind, for every directory OpenSlide or tiffslide would
    show as an associated image (the thumbnail in its Aperio place excepted)."""
    out: dict[int, str] = {}
    if fmt is SlideFormat.OME_TIFF:
        # tiffslide reads the first OME Image; every other one is an associated image.
        keep = {p.offset for p in tf.series[0].pages if p is not None}
        kinds: dict[int, str] = {}
        images = [im for im in ET.fromstring(pages[0].description) if _local(im.tag) == "Image"]
        for im in images[1:]:
            for td in (t for t in im.iter() if _local(t.tag) == "TiffData"):
                first = int(td.get("IFD", "0"))
                for k in range(first, first + int(td.get("PlaneCount", "1"))):
                    kinds[k] = _kind(im.get("Name", "")) or "image"
        return {
            p.offset: kinds.get(i, "image") for i, p in enumerate(pages) if p.offset not in keep
        }
    aperio = fmt is SlideFormat.APERIO_SVS
    for i, page in enumerate(pages[1:], start=1):
        desc = page.description or ""
        lines = desc.splitlines()
        # OpenSlide names an Aperio associated image by the second line's first word.
        named = _kind(lines[1].split(" ")[0]) if aperio and len(lines) > 1 else ""
        if named in ("label", "macro", "overview") or not (page.is_tiled or (aperio and i == 1)):
            subtype = {1: "label", 9: "macro"}.get(page.subfiletype, "") if aperio else ""
            out[page.offset] = named or _kind(desc) or subtype or "image"
    return out


def _kind(name: str) -> str:
    """A removed image named by its kind only: its own name may be patient text."""
    return next((k for k in _ASSOCIATED if k in name.lower()), "")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _new_description(
    old: str, fmt: SlideFormat, report: DeidentifyReport, needles: set[str]
) -> str:
    if fmt is SlideFormat.APERIO_SVS and old.startswith("Aperio"):
        return _scrub_aperio(old, report, needles)
    if fmt is SlideFormat.GENERIC_TIFF and _TIFFFILE_SHAPE.fullmatch(old):
        return old  # tifffile's own shape record, needed to read the series back
    if old:
        report.scrubbed_fields.append("ImageDescription")
    return ""


def _scrub_aperio(text: str, report: DeidentifyReport, needles: set[str]) -> str:
    """Keep the header's software, size and tile tokens and the numeric fields tiling
    uses (AppMag, MPP...); drop file name, dates, user, scanner IDs and anything unknown."""
    head, *fields = text.split("|")
    lines = []
    for n, line in enumerate(re.split(r"(\r?\n)", head)):
        if n % 2:
            lines.append(line)
            continue
        tokens = line.split(" ")
        keep = [t for t in tokens if t in _APERIO_WORDS or _APERIO_TOKEN.fullmatch(t)]
        if len(keep) < len([t for t in tokens if t]):
            report.scrubbed_fields.append("aperio.header")
        lines.append(" ".join(keep))
    out = ["".join(lines)]
    for part in fields:
        key, _, value = (s.strip() for s in part.partition("="))
        if key in _APERIO_KEEP and _NUMBER.fullmatch(value):
            out.append(part)
            continue
        report.scrubbed_fields.append(f"aperio.{key}" if key in _APERIO_KNOWN else "aperio.other")
        if key in _APERIO_PERSONAL or key not in _APERIO_KNOWN:
            needles.add(value)
    return "|".join(out)


def _scrub_ome(
    xml: str, index_map: dict[int, int], report: DeidentifyReport, needles: set[str]
) -> str:
    """Rebuild the OME-XML from the first Image's pixel geometry alone (whitelisted
    elements and attributes, IDs renumbered, TiffData IFDs renumbered past removed ones)."""
    root = ET.fromstring(xml)
    for el in root.iter():
        name = _local(el.tag)
        if name == "BinaryOnly" or (name == "UUID" and el.get("FileName")):
            raise InvalidSlide("a multi-file OME-TIFF cannot be de-identified one file at a time")
        needles.update(v for k, v in el.attrib.items() if _local(k) in _OME_PERSONAL)
        if name in _OME_PERSONAL and el.text:
            needles.add(el.text.strip())
    image = next((c for c in root if _local(c.tag) == "Image"), None)
    if image is None:
        raise InvalidSlide("the OME-XML describes no image")
    counters: dict[str, int] = {}

    def node(el: ET.Element, name: str) -> str:
        attrs = []
        for key, value in el.attrib.items():
            if key == "ID" and key in _OME_ATTRS.get(name, ()):
                counters[name] = counters.get(name, -1) + 1
                attrs.append(f'ID="{name}:{counters[name]}"')
            elif key not in _OME_ATTRS.get(name, ()) or not _SAFE_VALUE.fullmatch(value):
                attr = _local(key) if _local(key).isalpha() else "other"
                report.scrubbed_fields.append(f"OME {name}.{attr}")
            elif name == "TiffData" and key == "IFD":
                attrs.append(f'IFD="{index_map[int(value)]}"')
            else:
                attrs.append(f"{key}={quoteattr(value)}")
        inner = []
        for child in el:
            cname = _local(child.tag)
            if cname in _OME_CHILDREN.get(name, ()):
                inner.append(node(child, cname))
            else:
                report.scrubbed_fields.append(f"OME {cname}" if cname.isalpha() else "OME other")
        head = " ".join([name, *attrs])
        return f"<{head}>{''.join(inner)}</{name}>" if inner else f"<{head}/>"

    ns = root.tag[1:].split("}")[0] if root.tag.startswith("{") else ""
    body = node(image, "Image")
    for child in root:
        if child is not image and _local(child.tag) != "Image":
            report.scrubbed_fields.append(f"OME {_local(child.tag)}")
    return f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns={quoteattr(ns)}>{body}</OME>'


def _verify_tiff(src: Path, tmp: Path, fmt: SlideFormat) -> None:
    """The copy must read as the same slide and show no associated image but a thumbnail."""
    sniffed = sniff_slide(tmp)
    if sniffed.format is not fmt:
        raise InvalidSlide(f"the de-identified copy no longer reads as {fmt.value}")
    try:
        before = open_slide(src)
    except InvalidSlide as e:
        raise InvalidSlide(f"the copy cannot be checked against the original: {e}") from e
    with before, open_slide(tmp) as after:
        if (before.level_dimensions, before.mpp) != (after.level_dimensions, after.mpp):
            raise InvalidSlide("the de-identified copy lost pyramid levels or its MPP")
    ts = tiffslide.TiffSlide(tmp)
    names = set(ts.associated_images)
    ts.close()
    if sniffed.backend == "openslide":
        with openslide.OpenSlide(tmp) as osr:
            names |= set(osr.associated_images)
    if names - {"thumbnail"}:
        raise InvalidSlide("associated images other than the thumbnail remain after removal")


def _sweep(path: Path, needles: set[str], protected: list[Range]) -> None:
    """Look for every removed identifying value anywhere in the file: a copy in bytes
    nothing references is zeroed, a copy inside kept data refuses the file."""
    patterns = set()
    for needle in needles:
        if len(needle.strip()) >= _MIN_NEEDLE:
            patterns |= {needle.strip().encode(c) for c in ("utf-8", "utf-16-le", "utf-16-be")}
    if not patterns or os.path.getsize(path) == 0:
        return
    guard = Guard(protected)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        for pattern in sorted(patterns):
            at = mm.find(pattern)
            while at >= 0:
                if guard.hits(at, len(pattern)):
                    raise InvalidSlide(
                        f"an identifying value removed elsewhere is still inside kept data "
                        f"(byte {at}): the file cannot be de-identified safely"
                    )
                mm[at : at + len(pattern)] = bytes(len(pattern))
                at = mm.find(pattern, at + len(pattern))
