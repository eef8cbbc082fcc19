"""De-identification of one DICOM whole-slide instance (the DICOM half of
``hepato.common.slides.deidentify``): patient, study, physician, institution and
specimen attributes are emptied (type 2 attributes must stay present), names, dates and
times anywhere in the dataset too, private elements are removed, and pydicom writes the
rest back unchanged: PixelData keeps the bytes it was read as, nothing is re-encoded.

A LABEL or OVERVIEW instance is refused rather than scrubbed: its pixels are the label
photograph itself. UIDs are kept so that the instances of a series still belong
together; several scanners derive them from a timestamp, so dates are emptied but not
searched for across the written file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.multival import MultiValue

from hepato.common.exceptions import InvalidSlide

_KEYWORDS = """PatientName PatientID IssuerOfPatientID PatientBirthDate PatientBirthTime PatientSex
    PatientAge PatientSize PatientWeight PatientAddress PatientComments PatientTelephoneNumbers
    PatientMotherBirthName OtherPatientIDs OtherPatientNames OtherPatientIDsSequence EthnicGroup
    MedicalRecordLocator AccessionNumber AdmissionID ReferringPhysicianName PhysiciansOfRecord
    PerformingPhysicianName NameOfPhysiciansReadingStudy RequestingPhysician OperatorsName
    InstitutionName InstitutionAddress InstitutionalDepartmentName StationName StudyID
    StudyDescription SeriesDescription ImageComments DeviceSerialNumber ContainerIdentifier
    ContainerDescription IssuerOfTheContainerIdentifierSequence
    AlternateContainerIdentifierSequence SpecimenDescriptionSequence RequestAttributesSequence
    ReferencedPatientSequence ClinicalTrialSponsorName ClinicalTrialProtocolID
    ClinicalTrialSiteName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID"""
BLANK_KEYWORDS = frozenset(_KEYWORDS.split())
# Emptied wherever they occur, inside sequences too.
_BLANK_VRS = {"PN", "DA", "DT", "TM"}
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}
# Inside an emptied sequence only these are searched for afterwards: coded concepts
# (stains, fixatives) recur in kept attributes and are no one's identity.
_ITEM_TEXTS = {"SpecimenIdentifier", "SpecimenShortDescription", "SpecimenDetailedDescription"}
_ITEM_TEXTS |= {"TextValue", "ContainerIdentifier", "ContainerDescription", "PatientID"}


def deidentify_dicom(src: Path, dst: Path) -> tuple[list[str], set[str]]:
    """Write ``src`` de-identified to ``dst``; returns the names of the emptied or
    removed attributes and the removed text values (for a sweep of the written file)."""
    ds = pydicom.dcmread(src)
    kinds = {str(v).upper() for v in (ds.get("ImageType") or [])}
    for kind, what in (("LABEL", "label"), ("OVERVIEW", "macro (overview)")):
        if kind in kinds:
            raise InvalidSlide(
                f"the DICOM instance has ImageType {kind}: it is the slide's {what} image "
                "itself, to be left out rather than de-identified"
            )
    for flag in ("BurnedInAnnotation", "SpecimenLabelInImage"):
        if str(ds.get(flag, "")).upper() == "YES":
            raise InvalidSlide(f"the DICOM image has {flag} YES: identifying text is in its pixels")
    fields: list[str] = []
    needles: set[str] = set()

    def visit(_dataset: Any, elem: Any) -> None:
        if elem.tag.is_private or not (elem.keyword in BLANK_KEYWORDS or elem.VR in _BLANK_VRS):
            return
        if elem.value in (None, "", []):
            return
        fields.append(elem.keyword or str(elem.tag))
        _texts(elem, needles, top=True)
        elem.value = [] if elem.VR == "SQ" else ""

    ds.walk(visit)
    private: list[Any] = []
    ds.walk(lambda _d, e: private.append(e) if e.tag.is_private else None)
    if private:
        ds.remove_private_tags()
        fields.append("private tags")
    ds.save_as(dst)
    return sorted(set(fields)), needles


def _texts(elem: Any, out: set[str], top: bool = False) -> None:
    """The identifying text values of an element, sequences included, dates left out."""
    if elem.VR == "SQ":
        for item in elem.value:
            item.walk(lambda _d, e: _texts(e, out) if e.VR != "SQ" else None)
        return
    if elem.VR not in _TEXT_VRS or not (top or elem.VR == "PN" or elem.keyword in _ITEM_TEXTS):
        return
    values = elem.value if isinstance(elem.value, list | MultiValue) else [elem.value]
    for value in values:
        text = str(value)
        out |= {text, text.replace("^", " ").strip()}
