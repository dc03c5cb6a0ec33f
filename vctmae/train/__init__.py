"""vctmae.train: pretraining and finetuning loops, schedules, checkpoints, evaluation, explanations (SPEC §7–§8).

Entry points (one per command): `run_pretrain(PretrainConfig)`, `run_finetune(FinetuneConfig)`,
`run_eval(EvalConfig)`, `run_explain(ExplainConfig)`. This package never imports nibabel or ingest.
"""

from vctmae.train.config import EvalConfig, ExplainConfig, FinetuneConfig, PretrainConfig
from vctmae.train.evaluate import Predictions, compute_metrics, run_eval
from vctmae.train.explain import run_explain
from vctmae.train.finetune import FinetuneResult, run_finetune
from vctmae.train.loop import NonFiniteLossError, TrainState
from vctmae.train.pretrain import PretrainResult, run_pretrain
from vctmae.train.schedule import WarmupCosine, pretrain_peak_lr

__all__ = [
    "EvalConfig",
    "ExplainConfig",
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteLossError",
    "PretrainConfig",
    "PretrainResult",
    "Predictions",
    "TrainState",
    "WarmupCosine",
    "compute_metrics",
    "pretrain_peak_lr",
    "run_eval",
    "run_explain",
    "run_finetune",
    "run_pretrain",
]
