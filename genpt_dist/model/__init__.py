"""Plain-PyTorch models: the GPT policy (``gpt``), its sampler (``sampling``) and the discriminator."""
