"""One radiograph reader: DICOM, PNG or JPEG file -> display image in [0, 1] plus safe metadata.

:func:`read_radiograph` is the plain function; :class:`RadiographReader` wraps it as a MONAI
``ImageReader`` so that ``LoadImaged(keys="image", reader=RadiographReader())`` uses it. Always pass
the reader explicitly: with ``itk`` installed MONAI silently picks ``ITKReader`` for ``.dcm``, and
MONAI's ``PydicomReader`` applies only rescale slope/intercept and prunes the tags needed here.
Note that ``LoadImaged`` falls back to MONAI's other readers when ours raises (so a rejected CT
slice would still load); ``pipeline.data.transforms.LoadRadiographd`` uses this reader alone.

DICOM order of operations (PS3.3 C.11 / C.7.6.3):

1. decode (pydicom pixel-data plugins; compressed syntaxes via pylibjpeg/openjpeg/rle or gdcm),
   values masked to ``BitsStored``;
2. modality LUT: Modality LUT Sequence, else rescale slope/intercept;
3. VOI: VOI LUT Sequence or window center/width (``voi`` chooses, see :data:`VOI_MODES`);
4. MONOCHROME1 inversion relative to the *post-VOI* output range.

Intensity scale of the output (float32, always in [0, 1], 1 = displayed white):

* VOI LUT: LUT output divided by ``2**n - 1`` (``n`` = third LUT Descriptor value);
* window: the window function's display fraction (0 below, 1 above the window);
* no VOI: the modality-LUT output range implied by ``BitsStored``/``PixelRepresentation`` and the
  rescale (or the Modality LUT's output bits), mapped linearly onto [0, 1];
* MONOCHROME1 is then ``1 - v``, i.e. ``(min + max) - v`` of that output range;
* RGB / colour: ITU-R BT.601 luminance divided by ``2**BitsStored - 1``; PNG/JPEG: grey value
  divided by the format maximum (255 or 65535).

The array is rows x columns exactly as stored: never transposed, so that patient right stays on the
viewer's left and pixels can be written back without swapping. Metadata keep only what later steps
need (UIDs for a Secondary Capture in the source study, view, sex, spacing); patient name, ids and
dates never leave this module.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import ensure_tuple

# MONAI builds its GPU DICOM reader whenever LoadImage is constructed and warns (and logs) on every
# machine without nvImageCodec. DICOM never goes through MONAI's readers here (RadiographReader decodes it),
# so the warning only alarms users of every ingest.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec", category=UserWarning)
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

log = logging.getLogger(__name__)

VOI_MODES = ("auto", "window", "none")
"""``auto``: VOI LUT Sequence if present, else window; ``window``: window only; ``none``: no VOI."""

PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})  # DR: common non-standard code for DX
SECONDARY_CAPTURE_MODALITIES = frozenset({"OT", "SC"})
_SECONDARY_CAPTURE_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC, incl. multi-frame SC variants (.7.x)
_MIN_RADIOGRAPH_SIDE = 16  # smaller "images" are icons or thumbnails, not radiographs
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour encodings pydicom converts to RGB while decoding (YBR_FULL*, JPEG 2000's ICT/RCT).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_BT601 = np.array([0.299, 0.587, 0.114])
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
SUPPORTED_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg"})

# The only DICOM attributes copied into metadata (identifiers of people and dates never are).
_KEPT_TAGS = (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
    "Modality", "ViewPosition", "PatientSex",
)


class RadiographReadError(ValueError):
    """A file that cannot become a radiograph; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def read_radiograph(path: str | PathLike, voi: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """Read one radiograph as a float32 rows x columns array in [0, 1] and its safe metadata.

    ``voi`` is one of :data:`VOI_MODES` (DICOM only). Metadata keys: ``format`` (dicom|png|jpeg),
    ``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID``, ``SOPClassUID``, ``Modality``,
    ``ViewPosition``, ``PatientSex``, ``PixelSpacing`` (row, column) in mm from ImagerPixelSpacing
    else PixelSpacing, ``PhotometricInterpretation``, ``BitsStored``, ``original_shape`` and
    ``voi`` (the VOI step applied: lut|window|none); ``None`` where unknown.
    Raises :class:`RadiographReadError` naming the file and the reason.
    """
    if voi not in VOI_MODES:
        raise ValueError(f"voi must be one of {VOI_MODES}, got {voi!r}")
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise RadiographReadError(path, f"cannot open ({err.strerror or err})") from err
    if not head:
        raise RadiographReadError(path, "empty file")
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
        image, meta = _read_pillow(path)
    else:
        image, meta = _read_dicom(path, voi)
    if not np.isfinite(image).all():
        raise RadiographReadError(path, "pixel values contain NaN or infinity after decoding")
    if image.min() == image.max():
        log.warning("%s: constant image (every pixel %.4g)", path.name, float(image.min()))
    meta["original_shape"] = tuple(int(s) for s in image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), meta


def _empty_meta(file_format: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"format": file_format}
    meta.update({tag: None for tag in _KEPT_TAGS})
    meta.update(PixelSpacing=None, PhotometricInterpretation=None, BitsStored=None, voi="none")
    return meta


# --- PNG / JPEG -------------------------------------------------------------------------------


def _read_pillow(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise RadiographReadError(path, f"multi-frame image ({img.n_frames} frames) is not supported")
            file_format = "png" if img.format == "PNG" else "jpeg"
            # EXIF orientation is how a viewer shows the image, so it is part of its true orientation.
            img = ImageOps.exif_transpose(img)
            grey = img.mode in ("1", "L", "I") or img.mode.startswith("I;16")
            image = _pillow_to_grey(path, img)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise RadiographReadError(path, f"cannot decode image ({err})") from err
    meta = _empty_meta(file_format)
    meta["PhotometricInterpretation"] = "MONOCHROME2" if grey else "RGB"  # of the source, as for DICOM
    return image, meta


def _pillow_to_grey(path: Path, img) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.float64) / 255.0
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale PNGs open as "I;16" or, depending on Pillow, as 32-bit "I".
        array = np.asarray(img).astype(np.float64)
        if array.min() < 0 or array.max() > 65535:
            raise RadiographReadError(path, f"Pillow mode {mode} values outside the 16-bit range")
        return array / 65535.0
    if mode in ("1", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        # Alpha is dropped, not composited: a radiograph's transparency carries no anatomy.
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
        return rgb @ _BT601 / 255.0
    raise RadiographReadError(path, f"unsupported Pillow image mode {mode}")


# --- DICOM ------------------------------------------------------------------------------------


def _read_dicom(path: Path, voi: str) -> tuple[np.ndarray, dict[str, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise RadiographReadError(path, "not a DICOM file (no DICM preamble)") from err
    except Exception as err:  # pydicom raises many types (EOFError, struct.error, ...) on broken files
        raise RadiographReadError(path, f"truncated or corrupt DICOM ({type(err).__name__}: {err})") from err

    _check_radiograph(path, ds)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    try:
        stored = ds.pixel_array
    except Exception as err:  # decoder plugins and length checks raise assorted types
        raise RadiographReadError(path, f"cannot decode pixel data ({type(err).__name__}: {err})") from err

    meta = _dicom_meta(ds)
    if photometric in _COLOUR:
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise RadiographReadError(path, f"{photometric} pixel data decoded to shape {stored.shape}")
        image = stored.astype(np.float64) @ _BT601 / float(2 ** int(ds.BitsStored) - 1)
        return image, meta
    if stored.ndim != 2:
        raise RadiographReadError(path, f"expected one 2D frame, decoded shape {stored.shape}")
    image, meta["voi"] = _display_values(path, ds, stored, voi)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image, meta


def _check_radiograph(path: Path, ds) -> None:
    if "PixelData" not in ds:
        sop_name = getattr(getattr(ds, "SOPClassUID", None), "name", "")
        if "Image" in sop_name:  # an image SOP class without pixels: the file ends early
            raise RadiographReadError(path, f"no pixel data in an image object ({sop_name}): truncated file?")
        raise RadiographReadError(path, f"no pixel data ({sop_name or 'unknown SOP class'})")
    check_radiograph_header(path, ds)


def check_radiograph_header(path: str | PathLike, ds) -> None:
    """The checks that need no pixels: modality, frames, size, photometric interpretation.

    Raises :class:`RadiographReadError`. The folder manifest builder runs it on headers read with
    ``stop_before_pixels`` so that it skips the files ingest would reject without decoding them.
    """
    modality = str(getattr(ds, "Modality", "")).strip().upper()
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    if modality in SECONDARY_CAPTURE_MODALITIES:
        if not sop_class.startswith(_SECONDARY_CAPTURE_SOP_PREFIX):
            raise RadiographReadError(path, f"modality {modality} without a Secondary Capture SOP class")
    elif modality not in PROJECTION_MODALITIES:
        shown = modality or "(missing)"
        raise RadiographReadError(path, f"modality {shown} is not a projection radiograph")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise RadiographReadError(path, f"multi-frame ({frames} frames) is not supported")
    rows, cols = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))
    if min(rows, cols) < _MIN_RADIOGRAPH_SIDE:
        raise RadiographReadError(path, f"{rows}x{cols} pixels is too small for a radiograph")
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME + _COLOUR:
        raise RadiographReadError(path, f"unsupported PhotometricInterpretation {photometric or '(missing)'}")


def _dicom_meta(ds) -> dict[str, Any]:
    meta = _empty_meta("dicom")
    for tag in _KEPT_TAGS:
        value = getattr(ds, tag, None)
        meta[tag] = str(value).strip() if value not in (None, "") else None
    for tag in ("ImagerPixelSpacing", "PixelSpacing"):
        spacing = getattr(ds, tag, None)
        if spacing is not None and len(spacing) == 2:
            meta["PixelSpacing"] = (float(spacing[0]), float(spacing[1]))
            break
    meta["PhotometricInterpretation"] = str(ds.PhotometricInterpretation).strip().upper()
    meta["BitsStored"] = int(ds.BitsStored)
    return meta


def _display_values(path: Path, ds, stored: np.ndarray, voi: str) -> tuple[np.ndarray, str]:
    """Modality LUT then VOI; returns values in [0, 1] (MONOCHROME2 sense) and the VOI step name."""
    from pydicom.pixels import apply_modality_lut

    # float32 holds every 16-bit value exactly and halves the memory traffic of float64.
    values = apply_modality_lut(stored, ds).astype(np.float32, copy=False)
    if voi == "auto" and "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        try:
            lut_out, out_bits = apply_voi_lut_item(values, ds.VOILUTSequence[0], ds)
        except (ValueError, TypeError, AttributeError, IndexError) as err:
            raise RadiographReadError(path, f"unusable VOI LUT Sequence ({err})") from err
        return np.clip(lut_out / np.float32(2**out_bits - 1), 0.0, 1.0), "lut"
    if voi in ("auto", "window") and "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(_first(ds.WindowCenter))
        width = float(_first(ds.WindowWidth))
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        try:
            return apply_window(values, center, width, function), "window"
        except ValueError as err:
            log.warning("%s: window ignored (%s)", path.name, err)
    low, high = modality_output_range(ds)
    if high <= low:
        raise RadiographReadError(path, f"empty modality output range [{low}, {high}]")
    return np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0), "none"


def apply_voi_lut_item(values: np.ndarray, item, ds) -> tuple[np.ndarray, int]:
    """Look ``values`` up in one VOI LUT Sequence item; returns (LUT output, output bits).

    Inputs below the first mapped value take the first entry, inputs past the end the last
    (PS3.3 C.11.2.1.1). Written here rather than using ``pydicom.pixels.apply_voi`` because that
    indexes through an array of the LUT's output dtype, so with an 8-bit LUT an input more than
    255 above the first mapped value wraps around instead of clamping (pydicom 3.0.2).
    """
    entries, first_mapped, out_bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16  # 0 encodes 65536 entries
    if int(getattr(ds, "PixelRepresentation", 0)) == 1 and first_mapped >= 2**15:
        first_mapped -= 2**16  # US-encoded descriptor of a signed image
    raw = item.LUTData
    if isinstance(raw, bytes):  # OW: 16-bit words in the file's byte order
        little_endian = getattr(ds, "original_encoding", (None, True))[1] is not False
        lut = np.frombuffer(raw, dtype="<u2" if little_endian else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(raw, dtype=np.float32))
    if len(lut) != entries:
        raise ValueError(f"LUT Descriptor says {entries} entries, LUT Data holds {len(lut)}")
    index = np.clip(np.rint(values) - first_mapped, 0, entries - 1).astype(np.int64)
    return lut[index].astype(np.float32), out_bits


def _first(value: Any) -> Any:
    """Window tags may hold several alternatives; the first is the default presentation."""
    return value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window ``values`` to display fractions in [0, 1] (PS3.3 C.11.2.1.2 / C.11.2.1.3).

    ``LINEAR``: 0 if x <= c - 0.5 - (w-1)/2; 1 if x > c - 0.5 + (w-1)/2; else ((x - (c-0.5)) / (w-1) + 0.5).
    ``LINEAR_EXACT``: 0 if x <= c - w/2; 1 if x > c + w/2; else (x - c) / w + 0.5.
    ``SIGMOID``: 1 / (1 + exp(-4 (x - c) / w)).
    """
    # The piecewise definitions are the linear ramp clipped to [0, 1]: below/above the window the
    # ramp is already <= 0 / > 1, so clipping reproduces the standard's case split exactly.
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width}")
        if width == 1:  # degenerate window: a pure threshold at c - 0.5
            return (values > center - 0.5).astype(values.dtype)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if width <= 0:
        raise ValueError(f"{function} window width must be > 0, got {width}")
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflow far below the centre correctly gives 0
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    raise ValueError(f"unknown VOILUTFunction {function!r}")


def modality_output_range(ds) -> tuple[float, float]:
    """The range of modality-LUT output values the file can hold (not the range it does hold)."""
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence) > 0:
        out_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**out_bits - 1)
    bits = int(ds.BitsStored)
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


# --- MONAI ------------------------------------------------------------------------------------


class RadiographReader(ImageReader):
    """MONAI ``ImageReader`` over :func:`read_radiograph`; one file per call.

    Output is the rows x columns array (no ``swap_ij``/``reverse_indexing`` transpose, unlike MONAI's
    DICOM and PIL readers), ``original_channel_dim = "no_channel"``, and the safe metadata with
    unknown (``None``) entries dropped so that batches collate.
    """

    def __init__(self, voi: str = "auto") -> None:
        if voi not in VOI_MODES:
            raise ValueError(f"voi must be one of {VOI_MODES}, got {voi!r}")
        self.voi = voi

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(Path(str(f)).suffix.lower() in SUPPORTED_SUFFIXES for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        files = ensure_tuple(data)
        if len(files) != 1:
            raise ValueError(f"RadiographReader reads one file at a time, got {len(files)}: {files}")
        return read_radiograph(files[0], voi=self.voi)

    def get_data(self, img: tuple[np.ndarray, dict[str, Any]]) -> tuple[np.ndarray, dict]:
        image, meta = img
        header = {key: value for key, value in meta.items() if value is not None}
        header["spatial_shape"] = np.asarray(image.shape)
        header["original_channel_dim"] = "no_channel"
        return image, header
