"""Training balconies by KL self-distillation to the frozen full model (`balspec train`).

A recipe and `--set` overrides resolve to a `config.TrainingConfig`; `data` packs text into blocks; `loss`
computes the teacher's pass and each exit's KL; `train` is the accelerate loop, `run` the run directory (lock,
metrics, checkpoints, record) and `trainstate` the state that resumes a run exactly, without pickle. `sorted`
adds the methods that train the base too (SoFT, exits.train_base).
"""
