"""Typed, validated configuration for every stage.

One pydantic model per component, nested under `Config`. A recipe is a YAML file under `configs/`;
`load_config` applies `--set a.b=c` overrides to the raw mapping and validates once, so unknown keys and
bad values fail before any Ray worker starts, with the dotted path of the offending key. A stage that
starts from a checkpoint has its own copy of a shared section (`finetune.train`, `adversarial.optim`,
`reinforce.rollout.sampling`, ...): a subclass that changes only the defaults. Validation reads the
config alone: checks of the machine it runs on (is MLflow installed?) are the drivers'.

Modules, by concern: `base` (the strict section), `data` (prepare, loader), `model` (shapes, sampling),
`train` (optimizer, DeepSpeed, workers, schedule, fine-tuning), `rl` (reinforce, adversarial), `recipe`
(`Config`, pipeline, tracking), `loading` (YAML, overrides, the shipped recipes).
"""

from genpt_dist.config.base import Section
from genpt_dist.config.data import BYTE_ALPHABET, NUM_SPECIAL_TOKENS, DataConfig, LoaderConfig
from genpt_dist.config.loading import load_config, load_recipe, parse_override
from genpt_dist.config.model import ModelConfig, SamplingConfig, TransformerShape
from genpt_dist.config.recipe import Config, PipelineConfig, TrackingConfig
from genpt_dist.config.rl import (
    AdversarialConfig,
    DiscriminatorShape,
    DiscriminatorTrainConfig,
    PromptsConfig,
    ReinforceConfig,
    ReinforceOptim,
    ReinforceTrain,
    RolloutConfig,
    RolloutSampling,
)
from genpt_dist.config.train import (
    DeepSpeedConfig,
    FinetuneConfig,
    FinetuneOptim,
    FinetuneTrain,
    OptimConfig,
    ScalingConfig,
    TrainConfig,
)

__all__ = [
    "BYTE_ALPHABET",
    "NUM_SPECIAL_TOKENS",
    "AdversarialConfig",
    "Config",
    "DataConfig",
    "DeepSpeedConfig",
    "DiscriminatorShape",
    "DiscriminatorTrainConfig",
    "FinetuneConfig",
    "FinetuneOptim",
    "FinetuneTrain",
    "LoaderConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "PromptsConfig",
    "ReinforceConfig",
    "ReinforceOptim",
    "ReinforceTrain",
    "RolloutConfig",
    "RolloutSampling",
    "SamplingConfig",
    "ScalingConfig",
    "Section",
    "TrackingConfig",
    "TrainConfig",
    "TransformerShape",
    "load_config",
    "load_recipe",
    "parse_override",
]
