"""vctmae.train: pretraining and finetuning loops, schedules, checkpoints.

Entry points (one per command): `pretrain.run_pretrain(PretrainConfig)`,
`finetune.run_finetune(FinetuneConfig)`, the configs in `config` (torch-free: the command line
builds its options from them); both trainers are `run.build_run` + `loop.Trainer`.
Evaluation, explanation and the validation's predictions and metrics come from
`vctmae.infer`, the layer below. This package never imports nibabel or ingest.
"""
