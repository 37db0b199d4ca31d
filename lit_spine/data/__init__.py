"""Data: DICOM reading, series choice, annotations, cache, targets, transforms, datamodule."""
