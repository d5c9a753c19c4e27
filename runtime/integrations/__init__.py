"""memtrain inside existing trainers (docs/integrations.md).

- ``memtrain.runtime.integrations.hf``: ``MemtrainTrainer``, a ``transformers.Trainer``.
- ``memtrain.runtime.integrations.lightning``: ``MemtrainStrategy``, a ``lightning.pytorch`` strategy.
- ``memtrain.runtime.integrations.ray_train``: ``report`` and ``restore`` for a
  ``ray.train.torch.TorchTrainer`` loop.

Each module imports its library; importing this package imports none of them.
"""
