"""Synthetic whole-slide files for the reader tests, written offline: an Aperio-like SVS
(JPEG tiles, MPP in its description, label and macro pages carrying fake patient text),
a generic tiled pyramidal TIFF, an OME-TIFF with its pyramid in SubIFDs, and a DICOM WSI
(one file per level, written with pydicom).

Every slide shows the same level-0 picture: a white background with coloured squares at
known positions (``SQUARES``), so a test can check what a region read returns."""

from __future__ import annotations

import datetime
import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 2048, 1536
TILE = 256
LEVELS = 3  # downsamples 1, 2, 4
# (x, y, size, RGB) at level 0: squares that sit on tile borders on purpose.
SQUARES: tuple[tuple[int, int, int, tuple[int, int, int]], ...] = (
    (192, 192, 128, (220, 30, 30)),
    (1000, 600, 200, (30, 160, 40)),
    (1600, 1200, 256, (40, 40, 210)),
)
PATIENT = "Jane Doe"
PATIENT_TEXT = f"PATIENT: {PATIENT}"
SVS_MPP = 0.25
GENERIC_MPP = 0.5
OME_MPP = 0.5
DICOM_MPP = 0.5


def level0() -> np.ndarray:
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    for x, y, size, colour in SQUARES:
        img[y : y + size, x : x + size] = colour
    return img


def pyramid(levels: int = LEVELS) -> list[np.ndarray]:
    out = [level0()]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        down = prev[: h * 2, : w * 2].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        out.append(down.round().astype(np.uint8))
    return out


def _text_image(width: int, height: int, text: str) -> np.ndarray:
    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((10, height // 2), text, fill="black")
    return np.asarray(img)


def write_svs(path: Path, *, mpp: float = SVS_MPP) -> Path:
    """An Aperio-style SVS as OpenSlide expects it: tiled JPEG level 0, a stripped
    thumbnail second, the reduced levels, then stripped label and macro pages."""
    levels = pyramid()
    head = (
        f"Aperio Image Library v12.0.15\r\n{WIDTH}x{HEIGHT} [0,0 {WIDTH}x{HEIGHT}] ({TILE}x{TILE})"
    )
    meta = (
        f"JPEG/RGB Q=90|AppMag = 40|MPP = {mpp}|Filename = {PATIENT} biopsy 7"
        f"|Date = 01/02/26|Time = 10:11:12|User = {PATIENT_TEXT}|ScanScope ID = SS1234"
    )
    # metadata=None: tifffile would otherwise add its own JSON description.
    plain = {"photometric": "rgb", "metadata": None}
    jpeg = {"compression": "jpeg", "compressionargs": {"level": 90}, "photometric": "rgb"}
    jpeg["metadata"] = None
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(TILE, TILE), description=f"{head} {meta}", **jpeg)
        thumb = levels[-1][::2, ::2]
        tif.write(thumb, description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} {meta}", **plain)
        for lv in levels[1:]:
            size = f"{lv.shape[1]}x{lv.shape[0]}"
            tif.write(lv, tile=(TILE, TILE), description=f"{head} -> {size}", **jpeg)
        label = _text_image(400, 300, PATIENT_TEXT)
        tif.write(
            label,
            description=f"Aperio Image Library v12.0.15\nlabel 400x300 {PATIENT_TEXT}",
            subfiletype=1,  # OpenSlide names label and macro only with these types
            **plain,
        )
        macro = _text_image(800, 300, PATIENT_TEXT)
        tif.write(
            macro,
            description=f"Aperio Image Library v12.0.15\nmacro 800x300 {PATIENT_TEXT}",
            subfiletype=9,
            **jpeg,
        )
    return path


def write_generic_tiff(path: Path) -> Path:
    """A tiled pyramidal TIFF with every level in the main IFD chain, deflate (lossless)
    tiles, and the resolution in pixels per centimetre."""
    per_cm = 1e4 / GENERIC_MPP
    with tifffile.TiffWriter(path) as tif:
        for i, lv in enumerate(pyramid()):
            tif.write(
                lv,
                tile=(TILE, TILE),
                compression="zlib",
                photometric="rgb",
                resolution=(per_cm / 2**i, per_cm / 2**i),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )
    return path


def write_ome_tiff(path: Path) -> Path:
    """An OME-TIFF: level 0 in the main IFD, the reduced levels in its SubIFDs, and the
    physical pixel size in the OME-XML."""
    levels = pyramid()
    meta = {
        "axes": "YXS",
        "PhysicalSizeX": OME_MPP,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": OME_MPP,
        "PhysicalSizeYUnit": "µm",
    }
    opts = {"tile": (TILE, TILE), "compression": "jpeg", "photometric": "rgb"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, metadata=None, **opts)
    return path


def write_stripped_tiff(path: Path) -> Path:
    """A plain single-level TIFF in strips: an image, not a slide."""
    tifffile.imwrite(path, level0(), photometric="rgb")
    return path


def write_png(path: Path) -> Path:
    Image.fromarray(level0()).save(path, format="PNG")
    return path


def truncate(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_dicom(folder: Path) -> Path:
    """A DICOM WSI series as scanners write it: one VL Whole Slide Microscopy Image per
    level, TILED_FULL, JPEG baseline frames. Returns the level-0 file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    wsi_class = "1.2.840.10008.5.1.4.1.1.77.1.6"
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime(2026, 1, 2, 10, 11, 12)
    width_mm, height_mm = WIDTH * DICOM_MPP / 1000, HEIGHT * DICOM_MPP / 1000
    first = folder / "level-0.dcm"
    for i, lv in enumerate(pyramid()):
        h, w = lv.shape[:2]
        frames = []
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                part = lv[ty : ty + TILE, tx : tx + TILE]
                tile[: part.shape[0], : part.shape[1]] = part
                buf = io.BytesIO()
                Image.fromarray(tile).save(buf, format="JPEG", quality=95, subsampling=1)
                frames.append(buf.getvalue())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = wsi_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = wsi_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality = "SM"
        ds.PatientName, ds.PatientID = PATIENT.replace(" ", "^"), "PID-4711"
        ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.InstanceNumber, ds.SeriesNumber = i + 1, 1
        ds.ImageType = ["ORIGINAL" if i == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.Rows = ds.Columns = TILE
        ds.NumberOfFrames = len(frames)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.LossyImageCompression = "01"
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width_mm, height_mm
        ds.ImagedVolumeDepth = 0.001
        ds.NumberOfOpticalPaths = 1
        path_item = Dataset()
        path_item.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = [path_item]
        measures = Dataset()
        spacing = DICOM_MPP * 2**i / 1000
        measures.PixelSpacing = [spacing, spacing]
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        out = folder / f"level-{i}.dcm"
        ds.save_as(out, enforce_file_format=True)
    return first
