"""vctmae.train: pretraining and finetuning loops, schedules, checkpoints, evaluation, explanations.

Entry points (one per command): `run_pretrain(PretrainConfig)`, `run_finetune(FinetuneConfig)`,
`run_eval(EvalConfig)`, `run_explain(ExplainConfig)`; both trainers are `build_run` + `Trainer`.
This package never imports nibabel or ingest. The public names load their module on first use
(PEP 562), so the command line can read the configs without importing torch.
"""

from vctmae.lazy import lazy_exports

_EXPORTS = {
    "EvalConfig": "config",
    "ExplainConfig": "config",
    "FinetuneConfig": "config",
    "PretrainConfig": "config",
    "RunOptions": "config",
    "SpeedOptions": "config",
    "Predictions": "evaluate",
    "compute_metrics": "evaluate",
    "run_eval": "evaluate",
    "run_explain": "explain",
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
