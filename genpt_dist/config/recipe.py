"""`Config`, a whole recipe, and the sections that belong to no one stage: pipeline and tracking."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from genpt_dist.config.base import Section
from genpt_dist.config.data import DataConfig, LoaderConfig
from genpt_dist.config.model import ModelConfig, SamplingConfig
from genpt_dist.config.rl import AdversarialConfig, ReinforceConfig
from genpt_dist.config.train import DeepSpeedConfig, FinetuneConfig, OptimConfig, ScalingConfig, TrainConfig


class PipelineConfig(Section):
    """Which stages `pipeline` (and `demo`) run, and what they leave behind."""

    adversarial: bool = Field(True, description="run the adversarial REINFORCE stage after pretraining")
    finetune: bool = Field(True, description="fine-tune on --task when one is given")
    export_format: Literal["safetensors", "hf"] = Field("hf", description="format of <run>/export")
    report_samples: int = Field(3, ge=0, description="sample generations shown in report.md")


class TrackingConfig(Section):
    """Experiment tracking: rank 0 logs each stage's config (as params), its metrics records and its final
    checkpoint URL to an MLflow run (genpt_dist/tracking.py; the `mlflow` extra). Off unless mlflow_uri is set.

    Validation checks the URI's form only; that MLflow is installed is the driver's check before any worker
    starts (`tracking.check_tracking`), so that a config validates the same on every machine that reads it."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI: file:///ABS/PATH (a file store), http(s)://SERVER, databricks[://PROFILE], "
        "or a database URI of a full mlflow install (sqlite:///...); None = no tracking",
    )
    experiment: str = Field("genpt-dist", min_length=1, description="MLflow experiment (created when missing)")
    run_name: str | None = Field(
        None, min_length=1, description="MLflow run name; default: the run URL's last part and the stage"
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _check_uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        scheme, sep, _ = uri.partition("://")
        if uri != "databricks" and not (sep and scheme[:1].isalpha()):
            raise ValueError(
                f"{uri!r} is not a URI: use file:///absolute/path, http(s)://host:port or databricks "
                "(a bare path would be resolved on each worker's own working directory)"
            )
        return uri


class Config(Section):
    """A whole recipe."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    adversarial: AdversarialConfig = Field(
        default_factory=AdversarialConfig, description="the seed's recipe: REINFORCE against the online discriminator"
    )
    reinforce: ReinforceConfig = Field(default_factory=ReinforceConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_context(self) -> Config:
        block = self.model.block_size
        if block is not None and block < self.data.seq_len:
            raise ValueError(f"model.block_size={block} is shorter than data.seq_len={self.data.seq_len}")
        return self

    @property
    def block_size(self) -> int:
        return self.model.block_size or self.data.seq_len

    def stage_schedule(self, stage: str) -> tuple[TrainConfig, OptimConfig]:
        """The schedule and optimizer sections a stage trains with."""
        if stage == "pretrain":
            return self.train, self.optim
        sections: dict[str, FinetuneConfig | ReinforceConfig] = {
            "finetune": self.finetune,
            "adversarial": self.adversarial,
            "reinforce": self.reinforce,
        }
        section = sections[stage]
        return section.train, section.optim
