"""Training: ``loop.py`` (``train()``: set-up, resume, phases, finish — read it top to bottom),
``step.py`` (``TrainStep``, the one training step, eager or compiled whole) and ``optim.py``
(SGD and Adam as updates on tensors the step owns)."""

from lnsgd.train.loop import Phase, train

__all__ = ["Phase", "train"]
