"""Typed, validated configuration for every stage.

One pydantic model per component, nested under `Config`. A recipe is a YAML file under `configs/`;
`--set a.b=c` overrides are applied to the raw mapping before validation, so unknown keys and bad
values fail once, here, before any Ray worker starts, with the dotted path of the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from genpt_dist.errors import UserError

NUM_SPECIAL_TOKENS = 3  # <pad>, <bos>, <eos>
BYTE_ALPHABET = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _stage_section(cls: type[_Strict], **defaults: Any) -> Any:
    """The type of a stage's own copy of a shared section (`finetune.train`, `adversarial.optim`, ...):
    the same class, with this stage's defaults for the keys a recipe leaves out (not the class's)."""

    def merge(value: Any) -> Any:
        return {**defaults, **value} if isinstance(value, dict) else value

    return Annotated[cls, BeforeValidator(merge), Field(default_factory=lambda: cls(**defaults))]


class DataConfig(_Strict):
    """How `prepare` turns raw text into shards."""

    tokenizer: Literal["bpe", "byte"] = Field("bpe", description="byte-level BPE trained on the corpus, or raw bytes")
    vocab_size: int = Field(8192, description="BPE vocabulary size including the 3 special tokens")
    seq_len: int = Field(256, ge=2, description="tokens a model sees per sample; a sample stores seq_len + 1")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents (hash) or tokens (tail) for val")
    split: Literal["hash", "tail"] = Field("hash", description="hash: by document hash; tail: last tokens are val")
    shard_samples: int = Field(2048, ge=1, description="samples per WebDataset shard")
    text_field: str = Field("text", description="JSONL field holding a document's text")
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".py", ".jsonl", ".parquet"],
        description="file types taken from folders and globs (a .gz or .zst suffix is also accepted; "
        "datasets save_to_disk folders are always taken)",
    )
    tokenizer_train_bytes: int = Field(64 << 20, ge=1, description="corpus bytes sampled to train the BPE")
    parallel_min_bytes: int = Field(32 << 20, ge=0, description="corpora above this are tokenised by Ray tasks")
    unit_bytes: int = Field(16 << 20, ge=1 << 12, description="source bytes per tokenising work unit (a Ray task)")
    range_min_bytes: int = Field(
        64 << 20, ge=1 << 12, description="an uncompressed text or JSONL file this large is read in unit_bytes ranges"
    )
    seed: int = Field(0, description="seed of the segment shuffle across shards")

    @model_validator(mode="after")
    def _check_vocab(self) -> DataConfig:
        need = BYTE_ALPHABET + NUM_SPECIAL_TOKENS
        if self.tokenizer == "bpe" and self.vocab_size < need:
            raise ValueError(
                f"vocab_size={self.vocab_size} is smaller than the {BYTE_ALPHABET} byte symbols + "
                f"{NUM_SPECIAL_TOKENS} special tokens a byte-level BPE needs ({need})"
            )
        return self


class TransformerShape(_Strict):
    """The shape of a transformer stack: the GPT's, and the discriminator's encoder."""

    n_layer: int = Field(4, ge=1, description="transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads per block")
    d_model: int = Field(128, ge=1, description="embedding width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on embeddings, attention and MLP")

    @model_validator(mode="after")
    def _check_heads(self) -> TransformerShape:
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} does not divide d_model={self.d_model}")
        return self


class ModelConfig(TransformerShape):
    """The decoder-only GPT (GPT-2 layout)."""

    block_size: int | None = Field(None, ge=2, description="context length; defaults to data.seq_len")
    attention_dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="dropout on the attention weights alone; default: dropout. At 0 a CPU runs a faster kernel than "
        "the math path, which dropout needs, and draws no (B, H, T, T) random mask",
    )
    activation: Literal["gelu_new", "gelu", "relu"] = Field(
        "gelu", description="MLP activation, GPT-2's activation_function names (exports keep it; an init its own)"
    )


class LoaderConfig(_Strict):
    """The streaming WebDataset loader."""

    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank (0 = in-process)")
    max_bad_shard_fraction: float = Field(0.1, ge=0.0, le=1.0, description="stop when more shards than this are bad")
    seed: int = Field(0, description="seed of the per-epoch shard and sample shuffle")


class OptimConfig(_Strict):
    """AdamW with linear warmup and cosine decay."""

    lr: float = Field(6e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of the peak")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay on matrices")
    beta1: float = Field(0.9, gt=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.95, gt=0, lt=1, description="Adam beta2")
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0 = off)")


class DeepSpeedConfig(_Strict):
    """What each worker's DeepSpeed engine does."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage")
    offload_optimizer: bool = Field(False, description="keep optimizer state on the CPU (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters on the CPU (ZeRO 3)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto = GPU: bf16 where supported, else fp16; CPU: bf16 where a short matmul measures it "
        "faster than fp32, else fp32",
    )
    grad_accum: int = Field(1, ge=1, description="micro batches per optimizer step (pretrain, finetune)")

    @model_validator(mode="after")
    def _check_offload(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class ScalingConfig(_Strict):
    """How many Ray Train workers and what each gets."""

    num_workers: int | tuple[int, int] = Field(2, description="workers, or [min, max] for elastic training")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (also its torch threads)")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl backend")
    timeout_s: int = Field(1800, ge=10, description="collective timeout")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts before the run fails (-1 = forever)")

    @field_validator("num_workers")
    @classmethod
    def _check_workers(cls, n: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (n, n) if isinstance(n, int) else n
        if lo < 1:
            raise ValueError(f"must be >= 1, got {lo}")
        if lo > hi:
            raise ValueError(f"min {lo} > max {hi}")
        return n

    @property
    def worker_range(self) -> tuple[int, int]:
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])


class TrainConfig(_Strict):
    """A stage's schedule: steps, batch, and the cadence of logs, evaluations and checkpoints.

    `train` is pretraining's; `finetune.train` and `adversarial.train` are the same type with their
    stage's defaults. In the RL stage micro_batch_size is the rows per forward/backward of a policy
    update (the step's rows are accumulated) and the val batch size."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(8, ge=1, description="samples per rank per micro step")
    eval_every: int = Field(50, ge=1, description="steps between val evaluations")
    eval_batches: int = Field(4, ge=1, description="val batches per rank per evaluation")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in the run's storage")
    log_every: int = Field(10, ge=1, description="steps between progress lines")
    seed: int = Field(1337, description="model init and dropout seed")


class SamplingConfig(_Strict):
    """Defaults for `generate` and for rollouts."""

    max_new_tokens: int = Field(128, ge=1, description="tokens generated per prompt")
    top_k: int | None = Field(50, ge=1, description="sample among the k most likely tokens (the seed's strategy)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    temperature: float = Field(1.0, gt=0, description="softmax temperature")


class RolloutConfig(_Strict):
    """The pool of Ray rollout actors of the adversarial stage."""

    num_actors: int = Field(2, ge=1, description="rollout actors (R)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs Ray reserves per actor")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs Ray reserves per actor")
    threads: int = Field(1, ge=1, description="torch threads per actor")
    max_restarts: int = Field(3, ge=-1, description="restarts of a dead actor (-1 = forever)")
    prompt_len: int = Field(0, ge=0, description="real-text prefix tokens per prompt after <bos> (0 = from <bos>)")
    samples_per_prompt: int = Field(4, ge=1, description="rollouts per prompt (the group of group/RLOO baselines)")
    max_staleness: int = Field(
        0,
        ge=0,
        le=4,
        description="policy updates a rollout may lag: k >= 1 samples the rollouts of steps s+1..s+k while step s "
        "trains (one-step-off at 1) and corrects with the clipped importance ratio; 0 = strictly on-policy",
    )
    sampling: _stage_section(SamplingConfig, max_new_tokens=64) = Field(  # type: ignore[valid-type]
        description="how each rollout is sampled (max_new_tokens: tokens per rollout)"
    )


_DISC_SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 128, "dropout": 0.1}


class DiscriminatorTrainConfig(_Strict):
    """The Transformer-encoder discriminator (real vs generated) and its training schedule."""

    model: _stage_section(TransformerShape, **_DISC_SHAPE) = Field(  # type: ignore[valid-type]
        description="the encoder's shape"
    )
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    pretrain_steps: int = Field(20, ge=0, description="D updates on real vs initial-policy samples before RL")
    d_steps: int = Field(1, ge=0, description="D updates per generator update (0 = D fixed after pre-training)")


_ADV_TRAIN = {
    "steps": 50,
    "micro_batch_size": 16,
    "eval_every": 25,
    "eval_batches": 2,
    "checkpoint_every": 25,
    "log_every": 5,
}
_ADV_OPTIM = {"lr": 2e-5, "warmup_steps": 0, "min_lr_ratio": 1.0}


class PromptsConfig(_Strict):
    """The prompt file of `reinforce --prompts` (JSONL or parquet; its other fields reach the rewards)."""

    prompt_field: str = Field("prompt", description="field (column) holding the prompt text")
    held_out_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of prompts (by a hash of the text) held out, evaluated every eval_every"
    )
    eval_prompts: int = Field(64, ge=1, description="held-out prompts evaluated (greedy, one completion each)")
    pass_reward: float = Field(
        1.0, description="held-out accuracy: share of greedy completions whose reward reaches this (a checker's 1)"
    )


class ReinforceConfig(_Strict):
    """REINFORCE from rollout actors' samples, scored by the configured rewards, with a KL guard to the
    `--init` model. `reinforce` is it with the rewards a user names; `adversarial` (the seed's recipe)
    with the online discriminator and real-text prompts."""

    train: _stage_section(TrainConfig, **_ADV_TRAIN) = Field(  # type: ignore[valid-type]
        description="policy updates (steps), rows per forward/backward, cadence"
    )
    optim: _stage_section(OptimConfig, **_ADV_OPTIM) = Field(  # type: ignore[valid-type]
        description="the policy's optimizer (constant LR after warmup by default)"
    )
    rewards: list[str] = Field(
        default_factory=list,
        description="reward specs, summed with their weights: python:FILE.py:FUNC, python:package.module:FUNC, "
        "model:FOLDER, discriminator, each with an optional @WEIGHT (--reward replaces them)",
    )
    prompts_per_step: int = Field(8, ge=1, description="prompts per update, over all workers")
    reward: Literal["prob", "log"] = Field("prob", description="discriminator reward D(x) or log D(x)")
    baseline: Literal["ema", "group", "dr_grpo", "grpo", "rloo", "reinforce++", "none"] = Field(
        "rloo", description="advantage estimator (rl/reinforce.py states each)"
    )
    ema_decay: float = Field(0.9, ge=0, lt=1, description="moving-average baseline decay")
    normalize_advantages: bool = Field(True, description="divide advantages by their batch std")
    kl_coef: float = Field(0.05, ge=0, description="weight of KL(policy || pretrained)")
    kl_mode: Literal["reward", "loss"] = Field("loss", description="KL as a per-token reward penalty or a loss term")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus")
    clip_ratio: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="stale rollouts (rollout.max_staleness >= 1): the importance ratio is clipped "
        "to [1 - clip_ratio, 1 + clip_ratio] as PPO clips it",
    )
    mc_rollouts: int = Field(0, ge=0, description="SeqGAN Monte Carlo completions per prefix (0 = sequence reward)")
    mc_stride: int = Field(8, ge=1, description="token positions between Monte Carlo prefixes")
    # The pydantic plugin reads a field's default only from `= Field(default...)`, not from the Field in
    # `_stage_section`'s Annotated metadata, so it takes these classes' stage sections for required
    # arguments and their no-argument construction for an error; at runtime every section has a default.
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)  # type: ignore[arg-type]
    discriminator: DiscriminatorTrainConfig = Field(default_factory=DiscriminatorTrainConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _mc_needs_a_baseline_in_reward_units(self) -> ReinforceConfig:
        # A Monte Carlo token reward Q_t takes the row's baseline b = r - A; grpo and reinforce++ divide A by a
        # std, so r - A is no baseline in reward units and Q_t - b would mix scales.
        if self.mc_rollouts > 0 and self.baseline in ("grpo", "reinforce++"):
            raise ValueError(
                f"mc_rollouts needs a baseline in reward units (rloo, dr_grpo, group, ema, none), not {self.baseline}"
            )
        return self


_FT_TRAIN = {
    "steps": 200,
    "micro_batch_size": 8,
    "eval_every": 25,
    "eval_batches": 8,
    "checkpoint_every": 25,
    "log_every": 10,
}
_FT_OPTIM = {"lr": 3e-4, "warmup_steps": 10}


class FinetuneConfig(_Strict):
    """Supervised fine-tuning on a downstream task, with parts of the model held fixed."""

    train: _stage_section(TrainConfig, **_FT_TRAIN) = Field(  # type: ignore[valid-type]
        description="steps at most (early stopping may end sooner), examples per rank, cadence"
    )
    optim: _stage_section(OptimConfig, **_FT_OPTIM) = Field(  # type: ignore[valid-type]
        description="AdamW, warmup + cosine"
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of examples held out (by hash) for val")
    patience: int = Field(4, ge=0, description="evaluations without improvement before stopping (0 = never)")
    prompt_field: str = Field("prompt", description="JSONL field of the prompt")
    completion_field: str = Field("completion", description="JSONL field of the completion (the loss is on it)")
    text_field: str = Field("text", description="JSONL field of plain text examples (loss everywhere)")
    too_long: Literal["truncate", "refuse"] = Field("truncate", description="examples longer than the context")
    freeze_embeddings: bool = Field(False, description="hold token/position embeddings (and the tied head) fixed")
    freeze_first_blocks: int = Field(0, ge=0, description="hold the first N transformer blocks fixed")
    train_last_blocks: int | None = Field(None, ge=0, description="train only the last N blocks and ln_f")

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_at_evals(cls, raw: Any) -> Any:
        """Unless set, checkpoint_every follows eval_every: every evaluation saves a checkpoint."""
        train = raw.get("train") if isinstance(raw, dict) else None
        if isinstance(train, dict) and "eval_every" in train and "checkpoint_every" not in train:
            raw = {**raw, "train": {**train, "checkpoint_every": train["eval_every"]}}
        return raw

    @model_validator(mode="after")
    def _check_cadence(self) -> FinetuneConfig:
        if self.train.checkpoint_every % self.train.eval_every:
            raise ValueError(
                f"train.checkpoint_every={self.train.checkpoint_every} must be a multiple of "
                f"train.eval_every={self.train.eval_every}: the best checkpoint is chosen by val loss"
            )
        return self


class PipelineConfig(_Strict):
    """Which stages `pipeline` (and `demo`) run, and what they leave behind."""

    adversarial: bool = Field(True, description="run the adversarial REINFORCE stage after pretraining")
    finetune: bool = Field(True, description="fine-tune on --task when one is given")
    export_format: Literal["safetensors", "hf"] = Field("hf", description="format of <run>/export")
    report_samples: int = Field(3, ge=0, description="sample generations shown in report.md")


class TrackingConfig(_Strict):
    """Experiment tracking: rank 0 logs each stage's config (as params), its metrics records and its final
    checkpoint URL to an MLflow run (genpt_dist/tracking.py; the `mlflow` extra). Off unless mlflow_uri is set."""

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
        from genpt_dist.tracking import require_mlflow

        require_mlflow()  # before any worker starts: the one-line error naming the extra
        return uri


class Config(_Strict):
    """A whole recipe."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    # The ignores: stage sections' defaults are invisible to the pydantic plugin (see AdversarialConfig).
    adversarial: _stage_section(ReinforceConfig, rewards=["discriminator"]) = Field(  # type: ignore[valid-type]
        description="the seed's recipe: REINFORCE against the online discriminator"
    )
    reinforce: ReinforceConfig = Field(default_factory=ReinforceConfig)  # type: ignore[arg-type]
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)  # type: ignore[arg-type]
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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"config error at {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", yaml-parsed c)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"bad --set {text!r}: expected key=value, e.g. train.steps=100")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"bad --set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None


def _format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"config error at {path}: {msg}{more}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (a file, a shipped recipe's name, or the defaults), apply `--set` overrides,
    validate once."""
    raw: dict[str, Any] = {}
    if path is not None and not Path(path).exists() and "/" not in str(path) and not str(path).endswith(".yaml"):
        from genpt_dist.recipes import recipe_path

        path = recipe_path(str(path))  # a shipped recipe by name: `--config tiny`
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UserError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"config {path} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_validation_error(exc)) from None
