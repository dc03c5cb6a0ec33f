"""vctmae.infer: a finetuned classifier applied — the layer below training.

Device and speed set-up (`device`, `distributed`), the crops' views and their combination
(`views`), metrics and predictions.csv (`metrics`), the decision threshold recorded beside a
checkpoint (`threshold`), attention maps (`attention`), and the `eval` and `explain` commands
(`evaluate.run_eval`, `explain.run_explain`; their configs in the torch-free `config`).
Finetuning's validation, `vctmae predict` and these commands all use it; it never imports
`vctmae.train` or `vctmae.predict`.
"""
