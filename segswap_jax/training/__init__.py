"""Training SegSwap (an application on top of the core): the loop, its checkpoints, validation, mining.

  config.py       training configs -> model config, checks, the step's settings
  step.py         TrainState, optimiser and schedule, the pure train step (run under pmap)
  store.py        Orbax checkpoints of the train state + data iterators; model exports; the workdir
  loop.py         `train_and_evaluate(config, workdir)`: the loop behind `python -m segswap_jax.train`
  validation.py   held-out mask IoU / correspondence error, Brueghel validation mAP, pictures
  hard_mining.py  stage-2 hard negatives scored by the model
  metrics.py      metrics.jsonl and TensorBoard files
"""
