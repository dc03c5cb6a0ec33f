"""vctmae.predict: a patient's CT (NIfTI or DICOM) → per-vertebra fracture report.

Entry point: `run.run_predict(PredictConfig(...))`, the config in the torch-free `config`. It
uses ingest's discovery, reader and geometry and `vctmae.infer`'s multi-view probabilities and
attention maps, so it sits above both (inference and training never import ingest).
"""
