"""The small demo re-ID model (``load_model("demo")``): how it is trained and evaluated.

Trained on the synthetic individuals of :mod:`pairx_core.synthetic`; its weights and their card
(``DEMO_MODEL.md``) ship in ``pairx_core/weights``. To train it again::

    python -m pairx_core.demo_model --out pairx_core/weights [--minutes 10] [--steps 2800] [--seed 0]

- :mod:`.config`: architecture, sizes, seeds and :class:`~.config.TrainConfig`;
- :mod:`.training`: the training pool, losses and the training loop;
- :mod:`.evaluation`: held-out top-1 accuracy against a random-init copy, and a PAIR-X check;
- ``__main__``: the command line that trains, evaluates and writes the weights and ``demo.json``.
"""
