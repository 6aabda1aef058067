"""The adversarial (SeqGAN-style REINFORCE) stage: rewards, the policy-gradient math and rollout actors.

``reward`` and ``reinforce`` are pure tensor code; ``rollout`` holds the Ray rollout actors (import it
only where Ray is wanted); ``stage`` drives the stage.
"""
