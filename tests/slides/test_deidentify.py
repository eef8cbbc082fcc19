"""De-identification of synthetic slides: the copy has no label or macro image (for
OpenSlide and tiffslide alike), no patient, user, file name or date text anywhere in its
bytes in any common encoding, pyramid tiles byte for byte where they were, and the same
levels, MPP and pixels as the original; DICOM loses its patient attributes but keeps its
PixelData bytes, a LABEL instance is refused, and a refusal leaves no file behind."""

from __future__ import annotations

import functools
import hashlib
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pydicom
import pytest
import tifffile
import tiffslide
from pydicom.dataset import Dataset

from hepato.common.exceptions import InvalidSlide
from hepato.common.slides import open_slide
from hepato.common.slides.deidentify import DeidentifyReport, deidentify_slide
from tests.slides import make

# Every value make.py and the builders below plant that names a person, file or date:
# the Aperio Filename, Date, Time and ScanScope ID, patient IDs, dates, host, e-mail.
SECRETS = [make.PATIENT, make.PATIENT_TEXT, make.PATIENT.replace(" ", "^"), "PATIENT"]
SECRETS += [f"{make.PATIENT} biopsy 7", "01/02/26", "10:11:12", "SS1234", "PID-4711"]
SECRETS += ["2026:01:02", "HOST-JANE", "jane.doe@example.org"]
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def _with_writer(write: Callable[[Path], Path], **writer_args: Any) -> Callable[[Path], Path]:
    """A make.py writer run with TiffWriter options it does not expose (BigTIFF, byte order)."""

    def run(path: Path) -> Path:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(
                tifffile, "TiffWriter", functools.partial(tifffile.TiffWriter, **writer_args)
            )
            return write(path)

    return run


def write_tagged_tiff(path: Path, **writer_args: Any) -> Path:
    """A generic pyramid whose first page carries patient text in its description and in
    the name, date and host tags, with a stripped label page after the pyramid."""
    per_cm = 1e4 / make.GENERIC_MPP
    tags = [
        (315, "s", 0, make.PATIENT_TEXT, True),  # Artist
        (316, "s", 0, "HOST-JANE", True),  # HostComputer
        (269, "s", 0, f"{make.PATIENT} biopsy 7", True),  # DocumentName
        (285, "s", 0, "PID-4711", True),  # PageName
    ]
    with tifffile.TiffWriter(path, **writer_args) as tif:
        for i, lv in enumerate(make.pyramid()):
            tif.write(
                lv,
                tile=(make.TILE, make.TILE),
                compression="zlib",
                photometric="rgb",
                resolution=(per_cm / 2**i, per_cm / 2**i),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                description=f"slide of {make.PATIENT_TEXT}" if i == 0 else None,
                datetime="2026:01:02 10:11:12" if i == 0 else None,
                extratags=tags if i == 0 else (),
                metadata=None,
            )
        label = np.full((300, 400, 3), 200, np.uint8)
        tif.write(label, photometric="rgb", description=f"label {make.PATIENT_TEXT}", metadata=None)
    return path


def write_patient_ome(path: Path, **writer_args: Any) -> Path:
    """An OME-TIFF whose XML names the patient (image name, description, experimenter,
    annotations, acquisition date) and holds a second Image, the label, in IFD 1."""
    levels = make.pyramid()
    h, w = levels[0].shape[:2]
    pixels = 'DimensionOrder="XYCZT" Type="uint8" SizeC="3" SizeZ="1" SizeT="1" Interleaved="true"'
    size = f'PhysicalSizeX="{make.OME_MPP}" PhysicalSizeXUnit="&#181;m" '
    size += f'PhysicalSizeY="{make.OME_MPP}" PhysicalSizeYUnit="&#181;m"'
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="{OME_NS}" Creator="scanner">'
        '<Experimenter ID="Experimenter:0" FirstName="Jane" LastName="Doe" '
        'Email="jane.doe@example.org"/>'
        f'<Image ID="Image:0" Name="{make.PATIENT_TEXT} biopsy">'
        "<AcquisitionDate>2026-01-02T10:11:12</AcquisitionDate>"
        '<ExperimenterRef ID="Experimenter:0"/>'
        f"<Description>{make.PATIENT_TEXT}</Description>"
        f'<Pixels ID="Pixels:0" {pixels} SizeX="{w}" SizeY="{h}" {size}>'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="3" Name="{make.PATIENT}"/>'
        '<TiffData IFD="0" PlaneCount="1"/></Pixels></Image>'
        '<Image ID="Image:1" Name="label">'
        f'<Pixels ID="Pixels:1" {pixels} SizeX="400" SizeY="300">'
        '<Channel ID="Channel:1:0" SamplesPerPixel="3"/><TiffData IFD="1" PlaneCount="1"/>'
        "</Pixels></Image>"
        '<StructuredAnnotations><MapAnnotation ID="Annotation:0"><Value>'
        f'<M K="Patient">{make.PATIENT_TEXT}</M></Value></MapAnnotation></StructuredAnnotations>'
        "</OME>"
    )
    opts: dict[str, Any] = {"tile": (make.TILE, make.TILE), "compression": "jpeg"}
    opts["photometric"] = "rgb"
    with tifffile.TiffWriter(path, ome=False, **writer_args) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, description=xml, metadata=None, **opts)
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, metadata=None, **opts)
        tif.write(np.full((300, 400, 3), 90, np.uint8), photometric="rgb", metadata=None)
    return path


BIG_BE: dict[str, Any] = {"bigtiff": True, "byteorder": ">"}
# name -> (writer, associated images removed)
TIFFS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "svs": (make.write_svs, ["label", "macro"]),
    "svs-bigtiff-be": (_with_writer(make.write_svs, **BIG_BE), ["label", "macro"]),
    "svs-bigtiff-le": (_with_writer(make.write_svs, bigtiff=True), ["label", "macro"]),
    "generic": (make.write_generic_tiff, []),
    "generic-tagged": (write_tagged_tiff, ["label"]),
    "generic-tagged-bigtiff-be": (functools.partial(write_tagged_tiff, **BIG_BE), ["label"]),
    "ome": (make.write_ome_tiff, []),
    "ome-patient": (write_patient_ome, ["label"]),
    # OpenSlide 4.0 reads no classic big-endian TIFF; tiffslide (OME's reader) does.
    "ome-patient-classic-be": (functools.partial(write_patient_ome, byteorder=">"), ["label"]),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    return {name: write(root / f"{name}.tif") for name, (write, _) in TIFFS.items()}


@pytest.fixture(scope="module")
def results(
    originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, DeidentifyReport]]:
    root = tmp_path_factory.mktemp("deidentified")
    out = {}
    for name, src in originals.items():
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        dst = root / f"{name}.tif"
        out[name] = (dst, deidentify_slide(src, dst))
        assert hashlib.sha256(src.read_bytes()).hexdigest() == digest, "the source changed"
    return out


def _encodings(text: str) -> Iterator[bytes]:
    for variant in {text, text.lower(), text.upper()}:
        for codec in ("ascii", "utf-8", "latin-1", "utf-16-le", "utf-16-be", "utf-32-le"):
            yield variant.encode(codec)


def assert_no_secrets(data: bytes) -> None:
    for secret in SECRETS:
        for pattern in _encodings(secret):
            assert pattern not in data, (secret, pattern)


@pytest.mark.parametrize("name", TIFFS)
def test_the_originals_do_carry_what_is_removed(originals: dict[str, Path], name: str) -> None:
    # Guards the fixtures: every case starts with patient text or an image to remove.
    data = originals[name].read_bytes()
    if name.startswith("svs"):
        with tiffslide.TiffSlide(originals[name]) as slide:
            assert {"label", "macro"} <= set(slide.associated_images)
    if name in ("generic", "ome"):
        return
    assert make.PATIENT.encode() in data


@pytest.mark.parametrize("name", TIFFS)
def test_label_and_macro_are_gone(
    results: dict[str, tuple[Path, DeidentifyReport]], name: str
) -> None:
    dst, report = results[name]
    assert report.removed_images == TIFFS[name][1]
    with tiffslide.TiffSlide(dst) as slide:
        assert not {"label", "macro"} & set(slide.associated_images)
        assert len(slide.ts_tifffile.series) == (2 if name.startswith("svs") else 1)
    if not name.startswith("ome"):
        with openslide.OpenSlide(dst) as osr:
            assert set(osr.associated_images) <= {"thumbnail"}
            props = "\n".join(f"{k}={v}" for k, v in osr.properties.items())
            assert make.PATIENT not in props
    if name.startswith("svs"):
        with openslide.OpenSlide(dst) as osr:
            assert osr.properties["aperio.AppMag"] == "40"
            assert float(osr.properties["aperio.MPP"]) == make.SVS_MPP
            assert "aperio.Filename" not in osr.properties
            assert "aperio.User" not in osr.properties


@pytest.mark.parametrize("name", TIFFS)
def test_no_patient_text_in_any_byte(
    results: dict[str, tuple[Path, DeidentifyReport]], name: str
) -> None:
    dst, report = results[name]
    assert_no_secrets(dst.read_bytes())
    # The report names fields, never their values.
    assert_no_secrets(repr(report).encode())
    if name.startswith("svs"):
        assert {"aperio.Filename", "aperio.User", "aperio.Date"} <= set(report.scrubbed_fields)
    if name.startswith("generic-tagged"):
        expected = {"Artist", "HostComputer", "DocumentName", "PageName", "DateTime"}
        assert expected <= set(report.scrubbed_fields)


def _pyramid_pages(tf: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    pages = [lv.keyframe for lv in tf.series[0].levels]
    return [p for p in pages if isinstance(p, tifffile.TiffPage)]


@pytest.mark.parametrize("name", TIFFS)
def test_tiles_are_byte_identical(
    originals: dict[str, Path], results: dict[str, tuple[Path, DeidentifyReport]], name: str
) -> None:
    src, dst = originals[name], results[name][0]
    with tifffile.TiffFile(src) as a, tifffile.TiffFile(dst) as b:
        before, after = _pyramid_pages(a), _pyramid_pages(b)
        assert len(before) == len(after) == make.LEVELS
        for p, q in zip(before, after, strict=True):
            assert p.is_tiled and q.is_tiled
            assert p.dataoffsets == q.dataoffsets
            assert p.databytecounts == q.databytecounts
            for offset, count in zip(p.dataoffsets, p.databytecounts, strict=True):
                a.filehandle.seek(offset)
                b.filehandle.seek(offset)
                assert a.filehandle.read(count) == b.filehandle.read(count)


@pytest.mark.parametrize("name", [n for n in TIFFS if n.startswith("svs")])
def test_label_and_macro_bytes_are_zeroed(
    originals: dict[str, Path], results: dict[str, tuple[Path, DeidentifyReport]], name: str
) -> None:
    data = results[name][0].read_bytes()
    with tifffile.TiffFile(originals[name]) as tf:
        removed = [p for p in tf.pages if isinstance(p, tifffile.TiffPage) and p.subfiletype]
        assert len(removed) == 2
        for page in removed:
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                assert data[offset : offset + count] == bytes(count)


@pytest.mark.parametrize("name", TIFFS)
def test_the_copy_reads_as_the_same_slide(
    originals: dict[str, Path], results: dict[str, tuple[Path, DeidentifyReport]], name: str
) -> None:
    with open_slide(originals[name]) as a, open_slide(results[name][0]) as b:
        assert b.format is a.format
        assert b.level_dimensions == a.level_dimensions
        assert b.mpp == a.mpp and b.mpp is not None
        for level in range(a.level_count):
            for x, y, size, _ in make.SQUARES:
                args = (level, x - 40, y - 40, size // 2, size // 2)
                assert np.array_equal(a.read_region(*args), b.read_region(*args))


def test_an_orphaned_copy_of_the_metadata_is_zeroed(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    # Editing tools leave old descriptions in bytes nothing points to any more.
    src = tmp_path / "orphan.svs"
    shutil.copyfile(originals["svs"], src)
    with open(src, "ab") as f:
        f.write(f"\0old: Filename = {make.PATIENT} biopsy 7|User = {make.PATIENT_TEXT}\0".encode())
    deidentify_slide(src, tmp_path / "out.svs")
    assert_no_secrets((tmp_path / "out.svs").read_bytes())


def test_a_value_inside_kept_data_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    # The Artist value also sits in the Software tag, which is kept: no safe copy exists.
    src = tmp_path / "software.tif"
    with tifffile.TiffWriter(src) as tif:
        for i, lv in enumerate(make.pyramid()):
            tif.write(
                lv,
                tile=(make.TILE, make.TILE),
                photometric="rgb",
                software=f"{make.PATIENT_TEXT} scanner" if i == 0 else None,
                extratags=[(315, "s", 0, f"{make.PATIENT_TEXT} scanner", True)] if i == 0 else (),
                subfiletype=1 if i else 0,
                metadata=None,
            )
    dst = tmp_path / "out" / "slide.tif"
    dst.parent.mkdir()
    with pytest.raises(InvalidSlide, match="kept data"):
        deidentify_slide(src, dst)
    assert list(dst.parent.iterdir()) == []


def test_exif_ifd_is_emptied(tmp_path: Path) -> None:
    # tifffile writes no EXIF IFD: a private tag (the last entry, like 34665 would be) is
    # renamed ExifIFD and pointed at an IFD appended afterwards.
    src = tmp_path / "exif.tif"
    with tifffile.TiffWriter(src) as tif:
        for i, lv in enumerate(make.pyramid()):
            exif = [(65000, 4, 1, 0, True)] if i == 0 else ()
            tif.write(lv, tile=(256, 256), photometric="rgb", subfiletype=min(i, 1), extratags=exif)
    with tifffile.TiffFile(src) as tf:
        entry_at = tf.pages.first.tags[65000].offset
    data = bytearray(src.read_bytes())
    data[entry_at : entry_at + 2] = struct.pack("<H", 34665)
    pointer_at = entry_at + 8
    data += bytes(len(data) % 2)
    ifd, date = len(data), b"2026:01:02 10:11:12\0"
    comment = b"ASCII\0\0\0" + make.PATIENT_TEXT.encode()
    values = ifd + 2 + 2 * 12 + 4
    data += struct.pack("<HHHII", 2, 36867, 2, len(date), values)
    data += struct.pack("<HHIII", 37510, 7, len(comment), values + len(date), 0)
    data += date + comment
    data[pointer_at : pointer_at + 4] = struct.pack("<I", ifd)
    src.write_bytes(bytes(data))
    with tifffile.TiffFile(src) as tf:
        assert tf.pages.first.tags[34665].value["DateTimeOriginal"]
    report = deidentify_slide(src, tmp_path / "out.tif")
    assert "ExifIFD" in report.scrubbed_fields
    assert_no_secrets((tmp_path / "out.tif").read_bytes())
    with tifffile.TiffFile(tmp_path / "out.tif") as tf:
        assert not tf.pages.first.tags[34665].value  # an empty IFD is left behind


def test_non_slides_are_refused(tmp_path: Path) -> None:
    src = make.write_png(tmp_path / "slide.svs")
    with pytest.raises(InvalidSlide):
        deidentify_slide(src, tmp_path / "out.svs")
    assert not (tmp_path / "out.svs").exists()


# DICOM


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """make.py's DICOM series, its level 0 given more of what a scanner records."""
    first = make.write_dicom(tmp_path_factory.mktemp("dicom") / "series")
    ds = pydicom.dcmread(first)
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.AccessionNumber = "ACC-JANE-1"
    ds.ReferringPhysicianName = "Doe^Jane"
    ds.OperatorsName = "PATIENT^Jane Doe"
    ds.InstitutionName = "HOST-JANE clinic"
    ds.StudyID, ds.SeriesDescription = "PID-4711-S", f"biopsy of {make.PATIENT_TEXT}"
    ds.ContainerIdentifier = "PID-4711-C"
    specimen = Dataset()
    specimen.SpecimenIdentifier = "PID-4711-A"
    specimen.SpecimenUID = pydicom.uid.generate_uid()
    specimen.SpecimenShortDescription = make.PATIENT_TEXT
    ds.SpecimenDescriptionSequence = [specimen]
    ds.add_new(0x00990010, "LO", "HEPATO TEST")
    ds.add_new(0x00991001, "LO", make.PATIENT_TEXT)
    ds.save_as(first)
    return first


def test_dicom_patient_attributes_are_emptied(dicom_series: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "level-0.dcm"
    dst.parent.mkdir()
    report = deidentify_slide(dicom_series, dst)
    assert report.removed_images == []
    expected = {"PatientName", "PatientID", "AccessionNumber", "OperatorsName", "private tags"}
    assert expected | {"SpecimenDescriptionSequence", "ContentDate"} <= set(report.scrubbed_fields)
    before, after = pydicom.dcmread(dicom_series), pydicom.dcmread(dst)
    assert str(before.PatientName) == make.PATIENT.replace(" ", "^")
    assert str(after.PatientName) == "" and after.PatientID == ""
    assert after.SOPInstanceUID == before.SOPInstanceUID
    assert after.PixelData == before.PixelData
    assert before.PixelData in dst.read_bytes()  # the encapsulated frames, unchanged
    assert_no_secrets(dst.read_bytes())
    assert_no_secrets(repr(report).encode())
    # OpenSlide still reads the instance (alone in its folder: one level).
    with openslide.OpenSlide(dst) as osr, openslide.OpenSlide(dicom_series) as orig:
        assert osr.level_dimensions[0] == (make.WIDTH, make.HEIGHT)
        region = ((900, 500), 0, (300, 300))
        assert np.array_equal(
            np.asarray(osr.read_region(*region)), np.asarray(orig.read_region(*region))
        )


@pytest.mark.parametrize("kind", ["LABEL", "OVERVIEW"])
def test_dicom_label_instance_is_refused(dicom_series: Path, tmp_path: Path, kind: str) -> None:
    ds = pydicom.dcmread(dicom_series)
    ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "NONE"]
    src = tmp_path / "label.dcm"
    ds.save_as(src)
    dst = tmp_path / "out.dcm"
    with pytest.raises(InvalidSlide, match=kind):
        deidentify_slide(src, dst)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["label.dcm"]
