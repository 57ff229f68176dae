"""The lyco-train TOML schema: one typed model per section, every key documented once.

Unknown keys, wrong types and impossible combinations fail validation (see `config_io` for the
messages with did-you-mean suggestions). Filesystem and installed-package checks that still run
before any model loads live in `config_io.check_environment`.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import difflib

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lyco.settings import NetworkConfig
from lyco.targets import PRESETS, ModuleOverride

OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy", "Adafactor", "Lion", "Lion8bit", "SGD")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
ALGOS = ("lora", "locon", "loha", "lokr")
Scalar = Union[bool, int, float, str]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelSection(Section):
    path: str = Field("builtin:tiny-sd", description="Base model: `builtin:tiny-sd`, `builtin:tiny-sd2`, `builtin:tiny-sdxl`, a diffusers folder, a hub id (`org/name`) or a single `.safetensors`/`.ckpt` checkpoint.")
    config_dir: Optional[str] = Field(None, description="For single-file checkpoints without network access: a local diffusers folder (or builtin name) of the same architecture.")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field("auto", description="`auto` reads it from the model's scheduler config (SD2-768 models are `v_prediction`).")
    clip_skip: int = Field(1, ge=1, le=12, description="Use the output of the N-th last text-encoder layer (1 = last). SDXL always uses the penultimate layer as it was trained; this is for SD1/SD2.")


class OverrideSection(Section):
    pattern: Optional[str] = Field(None, description="Regex searched in `<part>.<module path>`, e.g. `unet\\.mid_block` or `text_encoder\\..*mlp`.")
    classes: list[str] = Field([], description="Module class names (e.g. `ResnetBlock2D`); matching modules inside them get these settings.")
    algo: Optional[Literal[ALGOS]] = Field(None, description="Algorithm for the matched modules.")
    rank: Optional[int] = Field(None, ge=1, description="Rank for the matched modules.")
    alpha: Optional[float] = Field(None, description="Alpha for the matched modules.")
    conv_rank: Optional[int] = Field(None, ge=1, description="Conv rank for the matched modules.")
    conv_alpha: Optional[float] = Field(None, description="Conv alpha for the matched modules.")
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Input dropout for the matched modules.")
    rank_dropout: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Rank dropout for the matched modules.")
    module_dropout: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Module dropout for the matched modules.")
    dora: Optional[bool] = Field(None, description="DoRA for the matched modules.")
    dora_axis: Optional[Literal["input", "output"]] = Field(None, description="DoRA axis for the matched modules.")
    rs_lora: Optional[bool] = Field(None, description="rsLoRA scaling for the matched modules.")
    use_tucker: Optional[bool] = Field(None, description="Tucker decomposition of k x k convs for the matched modules.")
    factor: Optional[int] = Field(None, description="LoKr factor for the matched modules.")
    decompose_both: Optional[bool] = Field(None, description="LoKr decompose_both for the matched modules.")
    full_matrix: Optional[bool] = Field(None, description="LoKr full_matrix for the matched modules.")
    unbalanced_factorization: Optional[bool] = Field(None, description="LoKr unbalanced_factorization for the matched modules.")

    @model_validator(mode="after")
    def _has_target(self) -> "OverrideSection":
        if self.pattern is None and not self.classes:
            raise ValueError("an override needs `pattern` or `classes`")
        return self

    def to_core(self) -> ModuleOverride:
        settings = {k: v for k, v in self.model_dump(exclude={"pattern", "classes"}).items() if v is not None}
        return ModuleOverride(settings=settings, pattern=self.pattern, classes=tuple(self.classes))


class NetworkSection(Section):
    algo: Literal[ALGOS] = Field("lora", description="Adapter algorithm: `lora` (= `locon` when conv layers are targeted), `loha`, `lokr`.")
    rank: int = Field(8, ge=1, description="Rank (sd-scripts `network_dim`).")
    alpha: Optional[float] = Field(None, description="Alpha; the update is scaled by alpha / rank. Unset = rank (scale 1).")
    conv_rank: Optional[int] = Field(None, ge=1, description="Rank for k x k convs; setting it also targets ResNet/sampler convs in the `attn-mlp` preset (sd-scripts `conv_dim`).")
    conv_alpha: Optional[float] = Field(None, description="Alpha for k x k convs (unset = `alpha`).")
    preset: str = Field("attn-mlp", description="Target preset: " + ", ".join(f"`{name}`" for name in PRESETS) + ".")
    include: list[str] = Field([], description="Extra regexes (searched in `<part>.<module path>`) of modules to target.")
    exclude: list[str] = Field([], description="Regexes of modules never to target.")
    overrides: list[OverrideSection] = Field([], description="Per-module settings: `[[network.overrides]]` tables with `pattern` or `classes` plus any of algo, rank, alpha, conv_rank, conv_alpha, dropouts, dora, dora_axis, rs_lora and the LoKr/Tucker options.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout over the rank dimension.")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Probability of skipping a whole adapter in a training step.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    dora_axis: Literal["input", "output"] = Field("input", description="DoRA norm axis; `input` is what A1111 and ComfyUI both apply correctly.")
    rs_lora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(rank).")
    use_tucker: bool = Field(False, description="Tucker decomposition for k x k convs (LoRA, LoHa, LoKr).")
    factor: int = Field(-1, description="LoKr factor (-1 = most square factorization).")
    decompose_both: bool = Field(False, description="LoKr: also decompose the small factor.")
    full_matrix: bool = Field(False, description="LoKr: keep the second factor full (no rank).")
    unbalanced_factorization: bool = Field(False, description="LoKr: swap the output factors.")
    train_unet: bool = Field(True, description="Attach and train adapters on the UNet.")
    train_text_encoder: bool = Field(True, description="Attach and train adapters on the text encoder(s).")
    weights: Optional[str] = Field(None, description="Continue training from this adapter file (its modules and shapes must match this network config).")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            close = difflib.get_close_matches(value, list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}{hint}")
        return value

    @model_validator(mode="after")
    def _core_accepts(self) -> "NetworkSection":
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("train_unet and train_text_encoder are both false: nothing to train")
        self.to_core()  # the core's own checks (preset name, per-module overrides, ...)
        return self

    def parts(self) -> tuple[str, ...]:
        return (("unet",) if self.train_unet else ()) + (("text_encoder", "text_encoder_2") if self.train_text_encoder else ())

    def to_core(self) -> NetworkConfig:
        data = self.model_dump(exclude={"overrides", "include", "exclude", "train_unet", "train_text_encoder", "weights"})
        return NetworkConfig(**data, include=tuple(self.include), exclude=tuple(self.exclude),
                             overrides=tuple(o.to_core() for o in self.overrides), parts=self.parts())


class SubsetSection(Section):
    image_dir: str = Field(description="Folder of images with same-name caption files. A kohya `<repeats>_<name>` folder name sets `num_repeats` and `class_tokens`.")
    num_repeats: Optional[int] = Field(None, ge=1, description="How often each image is seen per epoch (unset: the folder's `<repeats>_` prefix, else 1).")
    class_tokens: Optional[str] = Field(None, description="Caption for images without a caption file (unset: the `<name>` of a `<repeats>_<name>` folder).")
    is_reg: bool = Field(False, description="Regularisation (prior-preservation) images; their loss is weighted by `training.prior_loss_weight`.")
    caption_extension: Optional[str] = Field(None, description="Overrides `dataset.caption_extension` for this subset.")
    shuffle_caption: Optional[bool] = Field(None, description="Overrides `dataset.shuffle_caption`.")
    keep_tokens: Optional[int] = Field(None, ge=0, description="Overrides `dataset.keep_tokens`.")
    caption_dropout_rate: Optional[float] = Field(None, ge=0.0, le=1.0, description="Overrides `dataset.caption_dropout_rate`.")
    caption_tag_dropout_rate: Optional[float] = Field(None, ge=0.0, le=1.0, description="Overrides `dataset.caption_tag_dropout_rate`.")
    flip_aug: Optional[bool] = Field(None, description="Overrides `dataset.flip_aug`.")
    random_crop: Optional[bool] = Field(None, description="Overrides `dataset.random_crop`.")


class DatasetSection(Section):
    generate: Optional[Literal["concept"]] = Field(None, description="`concept`: if `train_data_dir` does not exist yet, write the synthetic concept dataset there (trigger word `sks`; for the builtin tiny model).")
    train_data_dir: Optional[str] = Field(None, description="A kohya parent folder: every `<repeats>_<name>` folder inside becomes a subset.")
    reg_data_dir: Optional[str] = Field(None, description="A kohya parent folder of regularisation subsets.")
    subsets: list[SubsetSection] = Field([], description="Explicit subsets: `[[dataset.subsets]]` tables.")
    resolution: Optional[Union[int, list[int]]] = Field(None, description="Training size `N` or `[width, height]` in pixels (unset: the model's native size).")
    batch_size: int = Field(1, ge=1, description="Images per batch and device.")
    caption_extension: str = Field(".txt", description="Extension of caption files next to the images.")
    caption_separator: str = Field(",", description="Tag separator for shuffling and tag dropout.")
    shuffle_caption: bool = Field(False, description="Shuffle the caption's tags every time an image is used.")
    keep_tokens: int = Field(0, ge=0, description="Keep the first N tags in place when shuffling or dropping tags.")
    caption_dropout_rate: float = Field(0.0, ge=0.0, le=1.0, description="Probability of training on an empty caption.")
    caption_tag_dropout_rate: float = Field(0.0, ge=0.0, le=1.0, description="Probability of dropping each tag (after `keep_tokens`).")
    flip_aug: bool = Field(False, description="Random horizontal flips.")
    random_crop: bool = Field(False, description="Random instead of center crop to the bucket size.")
    enable_bucket: bool = Field(False, description="Aspect-ratio buckets; otherwise every image is resized and cropped to `resolution`.")
    min_bucket_reso: Optional[int] = Field(None, ge=8, description="Smallest bucket side (unset: resolution / 2).")
    max_bucket_reso: Optional[int] = Field(None, ge=8, description="Largest bucket side (unset: resolution * 2).")
    bucket_reso_steps: int = Field(64, ge=8, description="Bucket sides are multiples of this (must keep the UNet's downsampling exact: 64 for SD).")
    bucket_no_upscale: bool = Field(False, description="Never upscale: small images get a bucket of their own size (rounded down to `bucket_reso_steps`).")
    cache_latents: Literal["none", "memory", "disk"] = Field("none", description="Encode images once with the VAE: `memory` or `disk` (safetensors files keyed by image content and settings, so changed images or settings are re-encoded).")
    cache_dir: Optional[str] = Field(None, description="Folder of the disk latent cache (unset: `<output_dir>/cache`).")
    cache_text_encoder_outputs: bool = Field(False, description="Encode each caption once; needs a frozen text encoder and fixed captions.")
    on_corrupt_image: Literal["skip", "error"] = Field("skip", description="Unreadable images: `skip` with a warning naming the file, or `error`.")
    validation_split: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of the (non-regularisation) images held out for validation loss.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetSection":
        if isinstance(self.resolution, list) and len(self.resolution) != 2:
            raise ValueError("resolution: give one number or [width, height]")
        if self.generate and not self.train_data_dir:
            raise ValueError("generate needs train_data_dir (the folder to write the dataset to)")
        if self.min_bucket_reso and self.max_bucket_reso and self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(f"min_bucket_reso ({self.min_bucket_reso}) > max_bucket_reso ({self.max_bucket_reso})")
        crops = [s.image_dir for s in self.subsets if s.random_crop] + (["dataset"] if self.random_crop else [])
        if self.cache_latents != "none" and crops:
            raise ValueError(f"cache_latents = {self.cache_latents!r} with random_crop ({', '.join(crops)}): cached latents cannot be re-cropped; turn one off")
        if self.cache_text_encoder_outputs:
            varying = [name for name in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate")
                       if getattr(self, name) or any(getattr(s, name) for s in self.subsets)]
            if varying:
                raise ValueError(f"cache_text_encoder_outputs with {', '.join(varying)}: captions change every step, so their encodings cannot be cached")
        return self


DEFAULT_MAX_TRAIN_STEPS = 1600


class TrainingSection(Section):
    max_train_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to train (unset: 1600, unless `max_train_epochs` is set).")
    max_train_epochs: Optional[int] = Field(None, ge=1, description="Train this many epochs instead of `max_train_steps` (set only one).")
    seed: int = Field(42, description="Seed of everything random: data order, augmentation, noise, timesteps, initialisation.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Mixed precision through accelerate (GPU). On CPU training runs in fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimizer step (`accelerator.accumulate`).")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the gradient norm (0 = off).")
    noise_offset: float = Field(0.0, ge=0.0, description="Offset noise strength (per-channel constant added to the noise).")
    min_snr_gamma: Optional[float] = Field(None, gt=0.0, description="Min-SNR loss weighting gamma (5 is common).")
    zero_terminal_snr: bool = Field(False, description="Rescale the noise schedule to zero terminal SNR (use with v-prediction).")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field("l2", description="Loss between prediction and target.")
    huber_c: float = Field(0.1, gt=0.0, description="Huber / smooth-L1 threshold.")
    prior_loss_weight: float = Field(1.0, ge=0.0, description="Loss weight of regularisation images.")
    min_timestep: int = Field(0, ge=0, description="Lowest training timestep.")
    max_timestep: Optional[int] = Field(None, ge=1, description="Highest training timestep + 1 (unset: the scheduler's number of timesteps).")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention kernel: PyTorch SDPA, or xformers (needs xformers and CUDA; falls back to SDPA with a warning on CPU).")
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0, description="Keep an EMA of the adapter weights with this decay; saved files and samples then use the EMA weights.")
    validate_every_n_steps: Optional[int] = Field(None, ge=1, description="Validation-loss interval (unset: at the end of every epoch); needs `dataset.validation_split`.")
    vae_batch_size: int = Field(4, ge=1, description="Images per VAE call when caching latents.")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingSection":
        if self.max_train_epochs is not None and self.max_train_steps is not None:
            raise ValueError("set max_train_steps or max_train_epochs, not both")
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(f"max_timestep ({self.max_timestep}) must be > min_timestep ({self.min_timestep})")
        return self


class OptimizerSection(Section):
    type: str = Field("AdamW", description="Optimizer: " + ", ".join(f"`{o}`" for o in OPTIMIZERS) + " (case-insensitive). AdamW8bit/Lion8bit need bitsandbytes, Prodigy needs prodigyopt, Lion needs lion-pytorch.")
    learning_rate: float = Field(1e-4, gt=0.0, description="Base learning rate.")
    unet_lr: Optional[float] = Field(None, ge=0.0, description="UNet learning rate (unset: `learning_rate`).")
    text_encoder_lr: Optional[float] = Field(None, ge=0.0, description="Text-encoder learning rate (unset: `learning_rate`; 0 freezes the text-encoder adapters).")
    loraplus_ratio: Optional[float] = Field(None, gt=0.0, description="LoRA+: the up/B halves train with lr x ratio (16 is common).")
    weight_decay: float = Field(0.01, ge=0.0, description="Weight decay.")
    betas: Optional[list[float]] = Field(None, description="Adam/Lion betas, e.g. [0.9, 0.999] (unset: the optimizer's default).")
    eps: Optional[float] = Field(None, gt=0.0, description="Adam epsilon (unset: the optimizer's default).")
    args: dict[str, Scalar] = Field({}, description="Extra keyword arguments for the optimizer class, e.g. `{ d_coef = 1.0 }` for Prodigy.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field("constant", description="Scheduler from `diffusers.optimization` (`constant` becomes `constant_with_warmup` when there is warmup).")
    lr_warmup_steps: Union[int, float] = Field(0, ge=0, description="Warmup steps, or a fraction (< 1.0) of the total steps.")
    lr_scheduler_num_cycles: int = Field(1, ge=1, description="Cycles of `cosine_with_restarts`.")
    lr_scheduler_power: float = Field(1.0, gt=0.0, description="Power of `polynomial`.")

    @model_validator(mode="after")
    def _known(self) -> "OptimizerSection":
        canonical = {name.lower(): name for name in OPTIMIZERS}
        if self.type.lower() not in canonical:
            raise ValueError(f"type: unknown optimizer {self.type!r}; choose one of {', '.join(OPTIMIZERS)}")
        self.type = canonical[self.type.lower()]
        if self.betas is not None and len(self.betas) not in (2, 3):
            raise ValueError("betas: give 2 (or 3 for some optimizers) numbers")
        if isinstance(self.lr_warmup_steps, float) and self.lr_warmup_steps >= 1.0:
            raise ValueError("lr_warmup_steps: a float is a fraction of the total steps and must be < 1.0; use an integer for steps")
        return self


class SavingSection(Section):
    output_dir: str = Field("outputs", description="Where adapters, states, samples, logs and the progress file go.")
    output_name: str = Field("lyco", description="Adapter file name stem: `<name>.safetensors` at the end, `<name>-step000100.safetensors` in between.")
    save_every_n_steps: Optional[int] = Field(None, ge=1, description="Save an adapter every N steps.")
    save_every_n_epochs: Optional[int] = Field(None, ge=1, description="Save an adapter every N epochs.")
    keep_last: Optional[int] = Field(None, ge=1, description="Keep only the last K intermediate adapters (and states); unset keeps all.")
    save_precision: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="dtype of the saved adapter tensors.")
    save_state: bool = Field(False, description="Also write a resumable training state (accelerate `save_state`) with every save and at the end.")
    overwrite: bool = Field(False, description="Replace an existing final adapter file instead of refusing to start.")
    title: Optional[str] = Field(None, description="`modelspec.title` (unset: output_name).")
    author: Optional[str] = Field(None, description="`modelspec.author`.")
    description: Optional[str] = Field(None, description="`modelspec.description`.")
    license: Optional[str] = Field(None, description="`modelspec.license`.")
    tags: Optional[str] = Field(None, description="`modelspec.tags` (comma-separated).")
    comment: Optional[str] = Field(None, description="`ss_training_comment`.")


class PromptSection(Section):
    prompt: str = Field(description="Prompt text.")
    negative_prompt: Optional[str] = Field(None, description="Negative prompt (unset: `sampling.negative_prompt`).")
    seed: Optional[int] = Field(None, description="Seed (unset: `sampling.seed` + the prompt's index).")
    steps: Optional[int] = Field(None, ge=1, description="Denoising steps (unset: `sampling.steps`).")
    cfg_scale: Optional[float] = Field(None, ge=0.0, description="Classifier-free guidance scale (unset: `sampling.cfg_scale`).")
    width: Optional[int] = Field(None, ge=8, description="Width in pixels (unset: `sampling.width`).")
    height: Optional[int] = Field(None, ge=8, description="Height in pixels (unset: `sampling.height`).")


class SamplingSection(Section):
    every_n_steps: Optional[int] = Field(None, ge=1, description="Draw samples every N steps.")
    every_n_epochs: Optional[int] = Field(None, ge=1, description="Draw samples every N epochs.")
    at_start: bool = Field(False, description="Also draw samples before the first step.")
    prompts: list[PromptSection] = Field([], description="`[[sampling.prompts]]` tables: prompt, negative_prompt, seed, steps, cfg_scale, width, height.")
    negative_prompt: str = Field("", description="Default negative prompt.")
    seed: int = Field(0, description="Default seed; prompt i uses seed + i unless it sets its own.")
    steps: int = Field(20, ge=1, description="Default denoising steps.")
    cfg_scale: float = Field(7.5, ge=0.0, description="Default guidance scale.")
    width: Optional[int] = Field(None, ge=8, description="Default width (unset: the training resolution).")
    height: Optional[int] = Field(None, ge=8, description="Default height (unset: the training resolution).")


class LoggingSection(Section):
    trackers: list[Literal["tensorboard", "wandb"]] = Field(["tensorboard"], description="accelerate trackers (`[]` for none); wandb needs the wandb package and login.")
    logging_dir: Optional[str] = Field(None, description="Tracker folder (unset: `<output_dir>/logs`).")
    project_name: str = Field("lyco", description="Tracker project / run group name.")
    progress_file: Optional[str] = Field(None, description="JSON-lines progress file (unset: `<output_dir>/progress.jsonl`).")
    log_every_n_steps: int = Field(1, ge=1, description="Log loss and learning rate every N steps.")


class TrainConfig(Section):
    """A whole lyco-train run."""

    model: ModelSection = Field(ModelSection(), description="The base model.")
    network: NetworkSection = Field(NetworkSection(), description="The adapter network.")
    dataset: DatasetSection = Field(DatasetSection(), description="Images, captions, buckets and caches.")
    training: TrainingSection = Field(TrainingSection(), description="Steps, precision, noise and loss.")
    optimizer: OptimizerSection = Field(OptimizerSection(), description="Optimizer, learning rates and scheduler.")
    saving: SavingSection = Field(SavingSection(), description="Adapter files, states and metadata.")
    sampling: SamplingSection = Field(SamplingSection(), description="Sample images during training.")
    logging: LoggingSection = Field(LoggingSection(), description="Trackers and the progress file.")

    @model_validator(mode="after")
    def _cross_section(self) -> "TrainConfig":
        ds, net, opt = self.dataset, self.network, self.optimizer
        if ds.cache_text_encoder_outputs and net.train_text_encoder and opt.text_encoder_lr != 0:
            raise ValueError("dataset.cache_text_encoder_outputs with network.train_text_encoder: the text encoder is trained, "
                             "so its outputs change every step; set network.train_text_encoder = false (or optimizer.text_encoder_lr = 0)")
        if not ds.subsets and not ds.train_data_dir:
            raise ValueError("dataset: no images; set dataset.train_data_dir or add [[dataset.subsets]] with image_dir")
        if self.training.validate_every_n_steps and not ds.validation_split:
            raise ValueError("training.validate_every_n_steps needs dataset.validation_split > 0")
        if self.sampling.prompts and not (self.sampling.every_n_steps or self.sampling.every_n_epochs or self.sampling.at_start):
            pass  # prompts are still drawn once at the end
        return self
