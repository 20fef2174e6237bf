"""Typed configuration: one dataclass per concern, nested in :class:`Config`.

Every field has a type and a default, so OmegaConf can reject unknown keys and wrong types
when a YAML file or a ``key=value`` override is merged (see :mod:`clipkit.config.loader`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Where training data comes from and how it is read."""

    # Built-in demo data set prepared on first use ("digits" = sklearn's handwritten digits);
    # empty to train on your own shards given in ``train``.
    builtin: str = "digits"
    # Shard spec(s): brace expansion, several sources joined by "::" (weights in ``weights``).
    train: str = ""
    weights: list[float] = field(default_factory=list)
    # Number of samples in ``train`` (read from sizes.json when 0).
    num_samples: int = 0
    resampled: bool = False
    workers: int = 2
    shuffle_buffer: int = 2000
    # Where built-in data sets and other caches are written.
    cache_dir: str = "~/.cache/clipkit"
    # Caption field(s) in the shards, tried in order.
    caption_keys: list[str] = field(default_factory=lambda: ["txt", "text", "caption"])
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    # Where training JPEGs are decoded: "workers" (CPU, DCT-scaled) or "device" (nvJPEG on the
    # training GPU, crop and resize there; the workers only read; without CUDA: the workers).
    decode: str = "workers"


@dataclass
class ModelConfig:
    """The dual encoder: an open_clip architecture, optionally with an HF text tower."""

    # open_clip architecture name (``ViT-B-32``), a clipkit config under configs/models
    # (``clipkit-tiny``) or a path to a JSON model config.
    name: str = "clipkit-digits"
    # open_clip pretrained tag or a local checkpoint path.
    pretrained: str = ""
    # HF transformers text tower (local path or hub id); replaces the open_clip text tower.
    hf_text_model: str = ""
    hf_pooler: str = "mean_pooler"
    hf_proj: str = "linear"
    # LiT: freeze a tower; unlock its last N layer groups.
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # Cut each text batch to its longest real sequence (exact; see clipkit/models/text_tower.py),
    # rounded up to a multiple of text_length_multiple; false: always the full context length.
    dynamic_text_length: bool = True
    text_length_multiple: int = 8
    # A locked text trunk's outputs cached for repeated captions (rows; 0 = off).
    frozen_text_cache: int = 32768
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass
class LossConfig:
    """Contrastive loss, chosen by name from the registry in :mod:`clipkit.losses`."""

    name: str = "infonce"
    temperature: float = 0.07
    learnable_temperature: bool = True
    max_logit_scale: float = 100.0
    label_smoothing: float = 0.0
    # InfoNCE: average both directions (CLIP) or queries-to-keys only (SimCSE, MNRL).
    symmetric: bool = True
    # Tile size of the memory-efficient loss; 0 picks a default.
    chunk_size: int = 0
    # SigLIP initial scale and bias (Zhai et al. 2023).
    siglip_init_scale: float = 10.0
    siglip_init_bias: float = -10.0
    # MoCo-style FIFO of past keys used as extra negatives; 0 disables it.
    queue_size: int = 0
    # MoCo v2's two loss directions and the queue: "step" (both against the queue as it was
    # before the step, all keys pushed after: the MoCo authors' symmetrised demo) or
    # "direction" (view-1 queries first, their keys pushed, then view-2 queries against that
    # queue: lightly's CIFAR-10 benchmark, which calls its loss once per direction).
    moco_push: str = "step"
    # SLIP (Mu et al. 2021): task=clip with ssl_weight > 0 adds ssl_weight x NT-Xent (SimCLR)
    # over two augmented views of each training image, through an MLP head on the image trunk
    # (SLIP: 1.0 and a fixed temperature 0.1). task=clip then reads ssl.head, ssl.proj_hidden,
    # ssl.proj_dim, ssl.views (2) and ssl.recipe; the other ssl.* keys are not read. 0 = CLIP.
    ssl_weight: float = 0.0
    ssl_temperature: float = 0.1
    # Barlow Twins (Zbontar et al. 2021): weight of the off-diagonal (redundancy) term.
    barlow_lambda: float = 5e-3
    # SwAV (Caron et al. 2020): Sinkhorn-Knopp codes' entropy epsilon and iterations; the
    # predictions' softmax temperature is loss.temperature (SwAV: 0.1, learnable_temperature off).
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3


@dataclass
class OptimConfig:
    """The optimiser (by name) and the learning-rate schedule."""

    # "adamw" (CLIP, SimCSE) or "sgd" (with momentum; the image-SSL recipes).
    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.2
    # Which parameters decay: "clip" (not gains, biases, embeddings, temperature: CLIP's recipe)
    # or "all" (every trainable parameter, as lightly's SSL benchmarks train).
    decay: str = "clip"
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    momentum: float = 0.9  # SGD only
    # "cosine", "const-cooldown" or "constant".
    schedule: str = "cosine"
    warmup_steps: int = 50
    cooldown_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """The training loop."""

    # Per-process micro-batch size.
    batch_size: int = 128
    # Micro-batches per optimiser step (exact GradCache accumulation when > 1).
    accum_steps: int = 1
    epochs: int = 1
    # Stop after this many optimiser steps; 0 means run ``epochs`` epochs.
    max_steps: int = 0
    # "fp32", "bf16" or "fp16".
    precision: str = "fp32"
    seed: int = 0
    output_dir: str = "runs/digits"
    checkpoint_every: int = 0
    keep_last: int = 2
    # "", "latest" or a checkpoint path.
    resume: str = ""
    log_every: int = 10
    # Trackers for Accelerate ("tensorboard", "wandb"); empty list disables them.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Stop the run after this many consecutive non-finite losses.
    max_nonfinite: int = 5
    torch_threads: int = 0
    # On CUDA: TF32 matmuls for fp32 work and cuDNN autotuning (open_clip's defaults).
    tf32: bool = True
    # Append each step's sample keys to <output_dir>/keys.rank<R>.jsonl (audits data order/resume).
    record_keys: bool = False
    # Seconds a collective waits for a hung process before the run stops naming it (0: torch's
    # 1800); a process that dies is noticed at once (clipkit/train/fault.py).
    collective_timeout_s: int = 600
    # glibc: freed CPU memory stays in the process during training (no mmap, no trim), so steps
    # reuse their pages instead of faulting them in again (clipkit/train/allocator.py).
    keep_freed_memory: bool = True


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    # Zero-shot classification set (shard spec, ImageFolder dir or tar); built-in demo when empty.
    zeroshot: str = ""
    # Class names / templates: a built-in name ("digits", "cifar10", "imagenet") or a file path;
    # empty: the set's own (ImageFolder folder names, CLIP_benchmark's classnames.txt and
    # templates file, built-in templates for a known set name; the built-in demo's for it).
    classnames: str = ""
    templates: str = ""
    # Retrieval set (caption TSV/CSV, COCO JSON or shards); none when empty.
    retrieval: str = ""
    # STS file or folder evaluated during sentence-encoder training (task=simcse).
    sts: str = ""
    batch_size: int = 256
    # Evaluate every N optimiser steps (0 = only at the end).
    every: int = 0
    # Weighted kNN (InstDisc) of image features: labelled TEST set and the TRAIN set whose
    # features vote (any layout eval.zeroshot takes); none when empty.
    knn: str = ""
    knn_train: str = ""
    knn_k: int = 200
    knn_temperature: float = 0.07


@dataclass
class SimCSEConfig:
    """What only ``task=simcse`` reads (the sentence encoder comes from ``model.hf_text_model``)."""

    # Pooling "cls", "cls_mlp" or "mean"; SimCSE's unsupervised recipe keeps the MLP head in
    # training only (mlp_train_only).
    pooling: str = "mean"
    mlp_train_only: bool = False
    max_length: int = 32
    # Hard-negative mining: per anchor, add the N nearest pool sentences (current encoder)
    # whose cosine similarity is at most mine_max_sim (guard against false negatives); 0 = off.
    mine_negatives: int = 0
    mine_max_sim: float = 0.8


@dataclass
class SSLConfig:
    """What only the image self-supervised tasks read (simclr, moco, byol, barlow_twins, swav)."""

    # resnet18|resnet34|resnet50 (torchvision), open_clip:ARCH (vision tower) or timm:NAME.
    backbone: str = "resnet18"
    # torchvision ResNets: 3x3 stride-1 first conv and no max-pool (SimCLR's CIFAR variant).
    cifar_stem: bool = True
    image_size: int = 32
    # Projection / prediction heads (clipkit.models.ssl.HEADS); "" = the task's paper default.
    # SLIP (task=clip, loss.ssl_weight > 0) reads head ("" = "slip": SLIP's 3-layer BN MLP on
    # the image trunk), proj_hidden, proj_dim, views (must be 2) and recipe ("" = "slip") only.
    head: str = ""
    proj_hidden: int = 2048
    proj_dim: int = 128
    # Views per image (>= 2) and their augmentations (clipkit.data.views); "" = the task's.
    views: int = 2
    recipe: str = ""
    # Gaussian blur of the recipe's views: -1 = the recipe's own; 0 = PIL's radius blur (sigma
    # in pixels, as lightly's transforms and MoCo's code blur); > 0 = a kernel of that fraction
    # of the view side (the papers' 10%: 3 px at 32 px, much weaker than sigma 2 px in PIL).
    blur_kernel: float = -1.0
    # MoCo: 2 = v2 (queue, one direction), 3 = v3 (predictor, symmetric, no queue).
    moco_version: int = 2
    # Momentum teacher: cosine schedule from momentum to momentum_final (equal: constant).
    momentum: float = 0.99
    momentum_final: float = 1.0
    # SwAV: number of prototypes (0 for the other heads) and the optimiser steps for which
    # they stay frozen (gradients dropped), as the paper's first iterations.
    prototypes: int = 0
    freeze_prototypes_steps: int = 0
    # SwAV's multi-crop: small crops per image beside the views (paper: 6 at 96 px with 224 px
    # views), their side in px and crop scale; predicted, never a source of codes.
    small_views: int = 0
    small_size: int = 0
    small_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    # SwAV's queue for small batches: this rank's last queue_size projections of each large
    # crop join the Sinkhorn rows (codes only); filled from step queue_start_steps, used once
    # full. 0 = off (the paper: 3840 at batch 256, from epoch 15).
    queue_size: int = 0
    queue_start_steps: int = 0
    # Collapse guard: warn (once per fall) when the per-dimension std of the L2-normalised
    # projections, times sqrt(dim), falls below this (1 = spread as uniform; 0 = collapsed).
    collapse_threshold: float = 0.1


@dataclass
class Config:
    """Root configuration."""

    # What is trained: "clip" (image-text dual encoder), "simcse" (sentence encoder), "simclr"
    # or "moco" (image self-supervision); see clipkit.train.task.TASKS.
    task: str = "clip"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Per-task sections: read only by their task.
    simcse: SimCSEConfig = field(default_factory=SimCSEConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
