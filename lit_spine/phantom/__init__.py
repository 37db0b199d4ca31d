"""The built-in phantom: synthetic lumbar-spine MRI studies with labels caused by the drawing.

One module per concept, in the order data flows: `pathology` samples a study's disease labels
from the released data's priors; `anatomy` turns them into geometry (vertebral bodies,
discs, lesions) in a millimetre frame and defines the tissue ids; `canvas` holds the polygon
drawing primitives; `sagittal` and `axial` draw one slice into a tissue-id map, one function
per structure; `signal` turns tissue ids into T2 / T1 / fat-suppressed T2 signal with
partial volume, coil shading, blur and Rician noise; `study` renders a whole exam (series,
planes, points, pixels); `dicom` encodes slices as MR Image Storage files. The layouts write
studies to disk: `generate` (the challenge layout tianchi2020, with splits, annotation files
and an interrupt-safe marker), `rsna2024` and `spider`; `preview` draws a PNG grid of any
challenge-layout dataset. Reading these datasets is `lit_spine.data`'s job; the command
line is `lit_spine.commands.phantom`. See docs/phantom.md.
"""
