"""The rewards of the RL stage, one module per kind of scorer; nothing is imported here, so a module pulls
in only what it needs (`specs` is plain Python and torch, `reward_model` loads checkpoints and transformers).

* ``specs``: the ``--reward`` specs a user names (python:, model:, discriminator, @WEIGHT), the python
  reward functions (TRL's signature) they load, and the weighted combination of all components.
* ``reward_model``: ``model:`` rewards, a frozen sequence classifier (Hugging Face's, or a discriminator
  one of our runs trained) scoring prompt + completion.
* ``discriminator``: the online discriminator's reward transform, D(x) or log D(x) from its logit, and
  SeqGAN Monte Carlo token rewards.

How rewards become advantages (baselines, whitening) is the update's math, in ``rl.reinforce``.
"""
