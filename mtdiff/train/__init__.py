"""Training, read in the order it runs (the modules are imported one by one: ``mtdiff.sampling``
reads the task schedule, and the loop draws its preview grids with ``mtdiff.sampling``):

- :mod:`~mtdiff.train.step`: the one M5 training step (targets -> loss -> backward -> clip -> AdamW
  -> LR -> EMA), also what ``mtdiff bench train`` times;
- :mod:`~mtdiff.train.schedule`: which tasks each step trains (the single-task fine-tune);
- :mod:`~mtdiff.train.optim`: AdamW, the warmup-constant LR, the EMA;
- :mod:`~mtdiff.train.loader`: the data order (per-epoch permutation, entered mid-epoch on resume);
- :mod:`~mtdiff.train.loop`: setup -> resume -> the loop (logging, checkpoints, grids) -> summary;
- :mod:`~mtdiff.train.state`: what is saved and how a killed run resumes exactly;
- :mod:`~mtdiff.train.meter` and :mod:`~mtdiff.train.preemption`: losses, img/s, the curve; stop
  signals turned into a save.
"""
