"""dicomfl.common: the site-side data path (DICOM -> de-identified, full-depth tensors) and shared pieces."""

__version__ = "0.1.0"
