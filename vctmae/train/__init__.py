"""vctmae.train: pretraining and finetuning loops, schedules, checkpoints.

Entry points (one per command): `run_pretrain(PretrainConfig)`, `run_finetune(FinetuneConfig)`;
both trainers are `build_run` + `Trainer`. Evaluation, explanation and the validation's
predictions and metrics come from `vctmae.infer`, the layer below. This package never imports
nibabel or ingest. The public names load their module on first use
(PEP 562), so the command line can read the configs without importing torch.
"""

from vctmae.lazy import lazy_exports

_EXPORTS = {
    "FinetuneConfig": "config",
    "PretrainConfig": "config",
    "RunOptions": "config",
    "FinetuneResult": "finetune",
    "run_finetune": "finetune",
    "NonFiniteLossError": "loop",
    "Trainer": "loop",
    "TrainState": "loop",
    "PretrainResult": "pretrain",
    "run_pretrain": "pretrain",
    "Run": "run",
    "build_run": "run",
    "WarmupCosine": "schedule",
    "pretrain_peak_lr": "schedule",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
