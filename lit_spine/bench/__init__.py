"""`lit-spine bench`: time the suite's own parts against the obvious alternatives, in one run.

Every figure is measured here, now, on this machine; nothing is extrapolated or copied in.
A figure is the median of `--repeats` runs with their min and max; a ratio is the ratio of
two medians taken in the same run, with the runs of both sides interleaved (A, B, B, A, ...)
so that load from other processes on a shared machine hits both sides alike. Repeated calls
are timed with `torch.utils.benchmark.Timer`.

What is compared (`--only` picks sections by name; `sections.py`):

- ``phantom``   phantom generation (studies/s) and cache build (DICOM files/s, studies/s);
- ``io``        reading a cached image vs decoding its DICOM slice (the same pydicom decode,
                percentile window and letterbox resize the cache builder uses) each epoch;
- ``loader``    `SpineDataModule`'s augmented training loader (0 and 2 workers), no model;
- ``metric``    scoring 10,000 studies, and what `SpineModule.validation_step` costs per
                validation epoch beyond the net's forward pass of the same epoch;
- ``lightning`` `SpineModule` under `pl.Trainer` vs a plain PyTorch loop doing the same
                steps (same net and seed, same loader, optimizer and schedule);
- ``grid``      the real training step's images/s and peak memory per backbone x norm;
- ``precision`` the real `SpineModule` step in fp32/bf16 x NCHW/channels_last (and compiled)
                vs a plain fp32 step, the measured peak FLOP/s and MFU (`step.py`);
- ``sweep``     one sweep-preset run end to end, today's preset vs the one before bf16.

Output: one JSON line per figure on stdout, then a readable summary; `--out` writes
Markdown (atomically, `record.py`), `--json-out` all figures as JSON (`run.py`). The run
keeps to `--max-minutes` by skipping the remaining backbones (reported) when time runs short.
"""

from lit_spine.bench.cases import benchmark_scoring, loader_throughput, random_case

SECTIONS = ("phantom", "io", "loader", "metric", "lightning", "grid", "precision", "sweep")

__all__ = ["SECTIONS", "benchmark_scoring", "loader_throughput", "random_case"]
