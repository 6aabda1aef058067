"""The adversarial (SeqGAN-style REINFORCE) stage: rewards, the policy-gradient math and rollout actors.

``rewards`` names and scores the rewards (a package: user specs, reward models, the discriminator's
transform); ``reinforce`` is the update's pure tensor math; ``rollout`` holds the Ray rollout actors
(import it only where Ray is wanted); ``stage`` drives the stage.
"""
