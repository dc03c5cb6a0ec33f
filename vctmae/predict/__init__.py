"""vctmae.predict: a patient's CT (NIfTI or DICOM) → per-vertebra fracture report.

Entry point: `run_predict(PredictConfig(...))`. It uses ingest's discovery,
reader and geometry and `vctmae.infer`'s multi-view probabilities and attention
maps, so it sits above both (inference and training never import ingest). The public names
load their module on first use, so the command line reads the config without
importing torch.
"""

from vctmae.lazy import lazy_exports

_EXPORTS = {
    "PredictConfig": "config",
    "PredictResult": "run",
    "run_predict": "run",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
