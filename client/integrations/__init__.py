"""Integrations with trainers, each an optional extra: ``hf`` (transformers' Trainer, ``ckptd[hf]``) and
``lightning`` (a Lightning ``CheckpointIO``, ``ckptd[lightning]``). Import the submodule you need."""
