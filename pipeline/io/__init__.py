"""Reading and writing pixels: radiograph reader (DICOM/PNG/JPEG) and DICOM output."""
