"""Data: DICOM reading, series choice, annotations, phantom, cache, targets, transforms, datamodule."""
