"""Training engine; import from the modules (the package re-exports nothing, so importing one
module, e.g. ``damex.engine.checkpoint``, does not import the trainer):

- ``trainer``: ``train`` and ``Trainer`` (the loop); ``hooks``: schedule and budgets,
  evaluation and best checkpoint, periodic checkpoint, logging, signals;
- ``run_data`` / ``run_dir`` / ``loading``: what a run is built from, its folder and resume,
  loading a trained model (``evaluate``);
- ``checkpoint``, ``optim``, ``ema``, ``distributed``, ``expert_parallel``, ``logging``;
- ``inference`` (``run_inference``) and ``report`` (``evaluate_checkpoint``,
  ``visualize_routing``, ``run_demo``).
"""

__all__: list[str] = []
