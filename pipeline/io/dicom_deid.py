"""De-identification of a source radiograph's header (DICOM PS3.15 Annex E, Basic Profile).

Rather than deleting the attributes that Table E.1-1 lists, the de-identified dataset is built from an
*allowlist* of attributes that describe the pixels and the acquisition geometry and nothing else.
Anything not on the list (names, institution, physicians, descriptions, comments, private tags,
request sequences, device serial numbers, and attributes no table foresaw) never reaches the output,
which is stricter than the Basic Profile and therefore conforms to it. Then:

* patient: the pseudonym as name and id; birth date and sex empty (Type 2);
* study: date, time, id, accession number and referring physician empty (Type 2);
* dates and times are removed, not shifted (``LongitudinalTemporalInformationModified=REMOVED``), so
  no option beyond the Basic Profile is claimed;
* UIDs are replaced by :func:`pseudonymous_uid`, a keyed hash of the source UID, so the same source
  always maps to the same study/series/instance (a re-run does not duplicate a PACS study) while the
  mapping can only be reproduced with the site key (``SIMPLEBITS_PSEUDONYM_KEY``), on the user's side.

Pixel data are copied as they are. Pixels can carry burned-in identity, which the Basic Profile only
lets leave with the Clean Pixel Data Option (not implemented here), so
:func:`declares_no_burned_in_text` tells the caller whether the source declares it has none.
"""

from __future__ import annotations

import copy

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid

from pipeline.data.pseudonym import pseudonym

#: Fixed and public: it only separates our UIDs from other hashes; the secrecy is in the pseudonym key.
UID_NAMESPACE = "simplebits-cxr/deidentified-uid/v1"
#: The values of DeidentificationMethod are LO (at most 64 characters each).
DEIDENTIFICATION_METHOD = (
    "PS3.15 E.1.1 Basic Profile (SimpleBits allowlist)",
    "dates and times removed; private attributes removed",
    "UIDs replaced by a keyed hash; patient by a pseudonym",
)
#: The parts of a coded entry (no free text beyond the code's own meaning).
CODE_ITEM = ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning")
#: Attributes kept from the source; for a sequence, the attributes kept inside its items (none: the
#: sequence stays, empty, because the IOD requires it). All are coded, numeric or pixel attributes:
#: none holds free text an operator could type a name into.
KEPT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    keyword: () for keyword in (
        "SpecificCharacterSet", "ImageType", "SOPClassUID", "Modality", "SeriesNumber", "InstanceNumber",
        # the kind of equipment, not its identity (no serial number, station or institution)
        "Manufacturer", "ManufacturerModelName",
        "BodyPartExamined", "ViewPosition", "Laterality", "ImageLaterality", "PatientOrientation",
        "PresentationIntentType", "PositionerType", "DetectorType", "KVP", "Exposure", "ExposureTime",
        "XRayTubeCurrent",
        "DistanceSourceToDetector", "DistanceSourceToPatient", "ImagerPixelSpacing", "PixelSpacing",
        "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
        "HighBit", "PixelRepresentation", "PixelIntensityRelationship", "PixelIntensityRelationshipSign",
        "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction",
        "PresentationLUTShape", "LossyImageCompression", "LossyImageCompressionRatio",
        "LossyImageCompressionMethod", "BurnedInAnnotation", "PixelData", "AcquisitionContextSequence",
    )
} | {
    # LUTExplanation (free text) is left out of both tables.
    "VOILUTSequence": ("LUTDescriptor", "LUTData"),
    "ModalityLUTSequence": ("LUTDescriptor", "ModalityLUTType", "LUTData"),
    "AnatomicRegionSequence": CODE_ITEM,
    "ViewCodeSequence": CODE_ITEM,
}
#: Type 2 attributes of the Patient and General Study modules: present, but empty.
EMPTIED_ATTRIBUTES = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                      "AccessionNumber", "ReferringPhysicianName")


def pseudonymous_uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` and the pseudonym key (never reveals ``parts``)."""
    return generate_uid(entropy_srcs=[UID_NAMESPACE, pseudonym("|".join(parts), "uid")])


def declares_no_burned_in_text(source: Dataset) -> bool:
    """Whether the source states that its pixels carry no burned-in text (absent means unknown)."""
    return str(source.get("BurnedInAnnotation", "")).upper() == "NO"


def mark_deidentified(dataset: Dataset) -> None:
    """The Patient module's de-identification attributes (Type 1C once PatientIdentityRemoved is YES).

    Only DCM 113100 is claimed: dates are removed rather than shifted, descriptors removed rather than
    cleaned, and no private attribute is kept, so no profile option applies."""
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = list(DEIDENTIFICATION_METHOD)
    dataset.DeidentificationMethodCodeSequence = [
        CodedConcept.from_code(codes.DCM.BasicApplicationConfidentialityProfile)]
    dataset.LongitudinalTemporalInformationModified = "REMOVED"


def remove_dates(dataset: Dataset) -> None:
    """Delete every date, time and date-time that has a value, at any depth (empty Type 2 ones stay)."""
    for element in list(dataset):
        if element.VR in ("DA", "DT", "TM") and not element.is_empty:
            del dataset[element.tag]
        elif element.VR == "SQ":
            for item in element.value:
                remove_dates(item)


def deidentify(source: Dataset, patient_pseudonym: str) -> Dataset:
    """The source instance, de-identified: same pixels, pseudonymous patient and UIDs, nothing else."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not source.get(keyword):
            raise ValueError(f"source DICOM has no {keyword}")
    out = Dataset()
    for keyword, kept_in_items in KEPT_ATTRIBUTES.items():
        if keyword not in source:
            continue
        element = source[keyword]
        if element.VR == "SQ":
            items = [_kept(item, kept_in_items) for item in element.value] if kept_in_items else []
            setattr(out, keyword, Sequence(items))
        elif keyword == "PixelData":
            out.add(copy.copy(element))  # immutable bytes, possibly large: shared, not duplicated
        else:
            out.add(copy.deepcopy(element))
    # A trailing caret makes the pseudonym a family name (a bare one is the retired PN form).
    out.PatientName, out.PatientID = f"{patient_pseudonym}^", patient_pseudonym
    for keyword in EMPTIED_ATTRIBUTES:
        setattr(out, keyword, "")
    out.Manufacturer = out.get("Manufacturer", "")  # Type 2
    out.StudyInstanceUID = pseudonymous_uid(source.StudyInstanceUID)
    out.SeriesInstanceUID = pseudonymous_uid(source.SeriesInstanceUID)
    out.SOPInstanceUID = pseudonymous_uid(source.SOPInstanceUID)
    mark_deidentified(out)
    remove_dates(out)
    if "PixelData" in out:
        out.file_meta = FileMetaDataset()
        out.file_meta.MediaStorageSOPClassUID = out.SOPClassUID
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        # The pixels stay encoded as they are (JPEG lossless included).
        out.file_meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
        out.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return out


def _kept(item: Dataset, keywords: tuple[str, ...]) -> Dataset:
    out = Dataset()
    for keyword in keywords:
        if keyword in item:
            out.add(copy.deepcopy(item[keyword]))
    return out
