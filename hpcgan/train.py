"""Train a GAN (WGAN-GP-AC or a baseline) on shards, with DDP and mixed precision, resumably.

    torchrun --standalone --nproc_per_node=N -m hpcgan.train shards=DIR run_dir=DIR model=wgan_gp_ac steps=N
    srun python -m hpcgan.train ...        (Slurm tasks as ranks; see hpcgan/dist.py)
    python -m hpcgan.train ...             (one process)

Config: configs/train.yaml (+ configs/model/<model>.yaml for the architecture, loss and optimiser).
One step = one batch per rank = one critic update; the generator is updated every `n_critic` steps.
Length: `steps` (or `epochs`), and optionally `time_budget_s`: the run also ends, finished, after the first
step at which its training seconds (summed across resumes, read from one clock) reach the budget; all ranks
stop after the same step, and status.json's time_budget.step_reached is what repeats the run by steps.
All randomness of step s on rank r (noise, labels, codes, penalty interpolation, DiffAugment) comes from a
generator seeded by (seed, r, s), and the loader's order is a function of (seed, epoch, rank), so a run
resumed from a checkpoint repeats exactly what the uninterrupted run would have done.

EMA (ema > 0): G_ema averages the generator's weights with a decay warmed up from the first update
(ema_rampup, see ema_beta) and normalises with BatchNorm "standing statistics" computed for its own weights
(ema_standing_batches, see standing_stats) before every sample grid and checkpoint; a resumed run repeats
both exactly.

Run directory: config.yaml (with class_counts: the training images per class; a class without any is
refused by hpcgan.generate and its sample-grid row is greyed and crossed out), log.csv, curves.png (log.csv
and the sample diversity drawn, at every sample grid), samples/step-N.png, samples/diversity.csv,
scarce.json (with scarce=: the cut's content hashes), checkpoints/step-N.pt, status.json ({"state": "running" | "finished" | "failed" | "interrupted", "step",
"steps", ...; a finished run with an auxiliary classifier adds "class_signal", see
hpcgan.gauges.class_signal}), written by hpcgan.rundir.
Settings: TrainSettings (configs/train.yaml documents the same defaults); a bad value is a one-line error
and exit code 2. The run reads top to bottom in TrainingRun.run(): setup, resume, loop, finish.

Exit codes (every rank):
  0  finished (or was already finished)
  1  failed: an exception, or more than `max_bad_steps` consecutive non-finite steps (status "failed";
     the checkpoints written before the divergence are kept)
  3  stopped by SIGTERM / SIGUSR2 / SIGINT after writing a checkpoint at the current step (status
     "interrupted"): resubmit the same command to continue. Under torchrun the agent itself reports its
     own non-zero code; status.json is the reliable marker.

Precision: fp32; bf16 (autocast on CPU or GPU, no scaler); fp16 (CUDA only: autocast + GradScaler, with
the gradient penalty's inner gradient scaled and unscaled as in the PyTorch AMP notes); auto = bf16 on a
GPU that supports it, else fp32 (bf16 autocast on CPUs is often slower than fp32).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import inspect
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hpcgan import dist
from hpcgan.augment import parse_policy
from hpcgan.checkpoint import capture_rng, restore_rng, resume_point, save_checkpoint
from hpcgan.data.loader import BACKENDS
from hpcgan.data.shards import NO_TRAINING_IMAGES, unseen_classes
from hpcgan.gauges import CLASS_SIGNAL_ADVICE, DIVERSITY_COLUMNS, class_signal, grid_diversity
from hpcgan.latent import sample_latent
from hpcgan.models.bagan import AutoencoderStopped
from hpcgan.models.registry import GANSpec, build_model, optimiser_lr
from hpcgan.objectives import STAT_KEYS, GANObjective
from hpcgan.progress import Progress
from hpcgan.rundir import EXIT_FAILED, EXIT_OK, LOG, CsvLog, read_status, write_config, write_json, write_status
from hpcgan.settings import MISSING, SettingsError, check_choice, check_range, exit_on_error, field_defaults, parse

logger = logging.getLogger("hpcgan.train")

LOG_COLUMNS = ("step", "epoch", "time", *STAT_KEYS, "images_per_s", "lr", "bad_steps")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass
class TrainSettings:
    """What a training run takes; these defaults are the ones (configs/train.yaml documents the same values
    and what each means; `model` comes from configs/model/<name>.yaml)."""
    shards: Any = MISSING                      # a shard dir or a list of them
    run_dir: str = MISSING
    model: dict[str, Any] = MISSING            # GANSpec fields (checked by GANSpec.from_config)
    split: Any = "train"                       # a split, or several read as one: [train, val]
    scarce: dict[str, int] | None = None       # scarcity study: {class: N} cuts the train split (hpcgan.data.scarce)
    scarce_seed: int | None = None             # which cut (null: seed); the study's classifiers use the same
    steps: int | None = None                   # wins over epochs when set
    epochs: int = 50
    time_budget_s: float | None = None         # also stop (finished) at the first step after which the run's
                                               # training seconds, across resumes, reach this; null: no budget
    batch_size: int = 64                       # per rank
    ema: float = 0.0
    ema_rampup: float | None = 0.05            # see ema_beta
    ema_standing_batches: int = 16             # see standing_stats
    diffaug: Any = field(default_factory=list)  # a list of DiffAugment policies or "color,translation"
    balance_classes: bool = False
    flip: bool = False
    precision: str = "auto"
    device: str = "auto"
    channels_last: bool = True
    cudnn_benchmark: bool = True
    tf32: bool = True
    backend: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000                   # 0: only at the end
    samples_per_class: int = 8
    ckpt_every: int = 1000
    keep_last: int = 3
    max_bad_steps: int = 20
    progress: bool = True
    tensorboard: str = "auto"                  # auto | true | false

    def __post_init__(self) -> None:
        self.model = asdict(GANSpec.from_config(self.model))
        if not self.diffaug:  # none given: the model's own policy (configs/model/<name>.yaml `diffaug`)
            self.diffaug = list(self.model["diffaug"])
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("backend", self.backend, BACKENDS)
        for name in ("batch_size", "epochs", "log_every", "samples_per_class", "ckpt_every", "max_bad_steps",
                     "ema_standing_batches"):
            check_range(name, getattr(self, name), 1)
        for name in ("steps", "sample_every", "keep_last", "seed"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0)
        if self.num_threads is not None:
            check_range("num_threads", self.num_threads, 1)
        check_range("ema", self.ema, 0, 1)
        if self.time_budget_s is not None:
            check_range("time_budget_s", self.time_budget_s, 0)
        if self.ema_rampup is not None:
            check_range("ema_rampup", self.ema_rampup, 0)
        self._check_split()
        self._check_scarce()
        try:
            parse_policy(self.diffaug)
        except ValueError as e:
            raise SettingsError(f"diffaug={self.diffaug!r}: {e}") from None

    def _check_split(self) -> None:
        from hpcgan.data.shards import SPLITS
        names = [self.split] if isinstance(self.split, str) else list(self.split or [])
        if not names or len(set(names)) != len(names):
            raise SettingsError(f"split={self.split!r}: give a split or a list of different splits of {SPLITS}")
        for name in names:
            check_choice("split", name, SPLITS)
        self.split = names[0] if len(names) == 1 else [str(n) for n in names]

    def _check_scarce(self) -> None:
        if not self.scarce:
            self.scarce, self.scarce_seed = None, None
            return
        for name, n in self.scarce.items():
            check_range(f"scarce.{name}", n, 1)
        if self.split != "train":
            raise SettingsError(f"scarce= cuts the train split, but split={self.split!r}: a GAN of a scarcity "
                                "study reads the cut train split only (split=train)")
        if isinstance(self.shards, (list, tuple)):
            raise SettingsError("scarce= needs one shard set (shards=DIR), the one the study's classifiers use")
        self.scarce = {str(k): int(v) for k, v in self.scarce.items()}
        self.scarce_seed = self.seed if self.scarce_seed is None else self.scarce_seed
        check_range("scarce_seed", self.scarce_seed, 0)

    @property
    def spec(self) -> GANSpec:
        return GANSpec.from_config(self.model)


# ---- small pieces ----------------------------------------------------------------------------------

def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r}: choose one of {PRECISIONS}")
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA GPU (fp16 autocast + GradScaler); on CPU use "
                         "precision=bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], name == "fp16"


def configure_backends(device: torch.device, *, cudnn_benchmark: bool, tf32: bool) -> None:
    """CUDA kernel choices (no effect on CPU). cudnn.benchmark times the conv algorithms once for the fixed
    input shape and keeps the fastest (not bit-deterministic across runs); tf32 lets fp32 convs and matmuls
    use TF32 tensor cores (PyTorch's default for convs, not for matmuls); tf32=false is strict fp32."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of one step on one rank: a pure function of (seed, rank, step), so resume is exact."""
    h = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return g


def make_optimizer(params, optim: dict, net: str) -> torch.optim.Optimizer:
    """The optimiser of network `net` ("G" or "D") under a spec's `optim` (OptimSpec's fields, filled in by
    GANSpec.from_config; its lr_g / lr_d, when set, give the networks their own learning rates)."""
    lr = optimiser_lr(optim, net)
    if optim["name"] == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=tuple(optim["betas"]))


def grads_finite(module: nn.Module) -> torch.Tensor:
    """Whether every gradient is finite, as a device tensor (one fused norm: no per-parameter kernels)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.nn.utils.get_total_norm(grads, foreach=True).isfinite()


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, DDP) else m


# ---- the generator's exponential moving average --------------------------------------------------------

def ema_beta(decay: float, rampup: float | None, updates: int) -> float:
    """The EMA decay at the `updates`-th generator update (1, 2, ...): `decay`, capped while training is young
    so that the EMA's half-life is at most `rampup` x the updates so far (StyleGAN2-ADA's ema_rampup; there
    counted in images seen, the same thing at a fixed batch size). Without it a decay of 0.999 still holds
    94% of the random initialisation after 60 updates. rampup None or 0: `decay` from the first update."""
    if not rampup:
        return decay
    return min(decay, 0.5 ** (1.0 / (rampup * max(updates, 1))))


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of a module that keep running statistics (what eval mode normalises with)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model for the parameters. Buffers are copied (e.g. spectral-norm
    vectors), except BatchNorm running statistics: the live generator's describe the live weights, not the
    averaged ones; the EMA generator gets its own from standing_stats."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - beta)
    own = {id(b) for m in batchnorms(ema) for b in m.buffers(recurse=False)}
    for be, b in zip(ema.buffers(), model.buffers()):
        if id(be) not in own:
            be.copy_(b)


@torch.no_grad()
def standing_stats(G: nn.Module, spec: GANSpec, num_classes: int, *, batches: int, batch_size: int, seed: int,
                   device=None, labels: torch.Tensor | None = None) -> bool:
    """BigGAN's "standing statistics": G's BatchNorm running mean and variance recomputed for G's own weights,
    as the plain average (momentum None) of the batch statistics of `batches` batches of fresh latents drawn
    as training draws them (labels uniform over `labels`, default every class), with G in train mode. The latents come from
    their own generator seeded by `seed`, not the global RNG: the same weights give the same statistics.
    G is left in eval mode. False (nothing done) when G has no BatchNorm."""
    norms = batchnorms(G)
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    gen = torch.Generator().manual_seed(seed)
    G.train()
    try:
        for _ in range(batches):
            latent = sample_latent(spec, batch_size, gen, num_classes=num_classes, labels=labels, device=device)
            G(latent.z, latent.y)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        G.eval()
    return True


# ---- the model pair, its optimisers and one training step -------------------------------------------

class Trainer:
    """G, D (DDP-wrapped when distributed), EMA, optimisers, scalers, and `step()`."""

    def __init__(self, spec: GANSpec, num_classes: int, image_size: int, env: dist.DistEnv, *, seed: int,
                 precision: str = "fp32", ema: float = 0.0, ema_rampup: float | None = TrainSettings.ema_rampup,
                 standing: tuple[int, int] = (TrainSettings.ema_standing_batches, TrainSettings.batch_size),
                 diffaug: str = "", channels_last: bool = False, labels: list[int] | None = None,
                 class_counts: list[int] | None = None, pretrain=None):
        """ema: the EMA decay (0: no EMA generator); ema_rampup: see ema_beta; standing: (batches, batch size)
        of the EMA generator's standing statistics (see standing_stats); labels: the classes a conditional
        generator is trained to make (those with training images; default all): its fake labels are drawn
        uniformly from them, so no critic or generator step is spent on a class without a real image;
        class_counts: the training images per class, which scale a NoisyTwins generator's class-embedding noise
        (hpcgan.models.twins; default: the same noise for every class); pretrain: called as pretrain(G, D) on the
        fresh networks, before the EMA copy and the DDP wrappers (BAGAN's autoencoder, TrainingRun.autoencoder_init)."""
        self.spec, self.env, self.seed = spec, env, seed
        # NHWC: what tensor-core convs (cuDNN) and oneDNN want; NCHW makes them transpose around every conv.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.num_classes, self.image_size = num_classes, image_size
        some = labels is not None and sorted(set(labels)) != list(range(num_classes))
        self.labels = torch.tensor(sorted(set(labels)), dtype=torch.long) if some else None   # None: every class
        dtype, use_scaler = resolve_precision(precision, env.device)
        self.obj = GANObjective(spec, num_classes, diffaug=diffaug, device_type=env.device.type,
                                autocast_dtype=dtype)
        torch.manual_seed(seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        G, D = build_model(spec, num_classes, image_size, class_counts)
        G = G.to(env.device, memory_format=self.memory_format)
        D = D.to(env.device, memory_format=self.memory_format)
        if pretrain is not None:
            pretrain(G, D)
        self.G_ema = copy.deepcopy(G).eval().requires_grad_(False) if ema > 0 else None
        self.ema_decay, self.ema_rampup, self.standing = ema, ema_rampup, standing
        self.ema_standing = False  # whether G_ema's BatchNorm statistics are its own weights' (see ema_generator)
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            # No buffer broadcast: the critic runs forward twice (real, fake) before one backward, and DDP's
            # in-place broadcast of batch-norm buffers at the second forward invalidates the first one's
            # autograd graph (a RuntimeError on torch 2.11). Running stats are only used in eval mode (sample
            # grids and generation, from rank 0); training itself uses batch statistics.
            # (torch >= 2.14 renames the switch forward_sync_buffers and deprecates broadcast_buffers)
            buffers_off = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                           else {"broadcast_buffers": False})
            G, D = DDP(G, device_ids=ids, **buffers_off), DDP(D, device_ids=ids, **buffers_off)
        self.G, self.D = G, D
        self.n_critic = int(spec.optim["n_critic"])
        self.opt_G = make_optimizer(unwrap(G).parameters(), spec.optim, "G")
        self.opt_D = make_optimizer(unwrap(D).parameters(), spec.optim, "D")
        scaler = lambda: torch.amp.GradScaler("cuda") if use_scaler else None  # noqa: E731
        self.scaler_G, self.scaler_D = scaler(), scaler()

    # one optimiser update, or a skipped one when any rank saw a non-finite loss or gradient
    def _backward(self, loss: torch.Tensor, scaler) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    def _local_bad(self, loss: torch.Tensor, module: nn.Module, opt, scaler) -> torch.Tensor:
        if scaler is not None:
            scaler.unscale_(opt)
            return ~loss.isfinite()  # the scaler itself skips steps whose fp16 gradients overflowed
        return ~(loss.isfinite() & grads_finite(module))

    def _apply(self, bad: bool, opt, scaler) -> None:
        if bad:
            opt.zero_grad(set_to_none=True)
        elif scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
        if scaler is not None:
            scaler.update()

    def step(self, real: torch.Tensor, y: torch.Tensor, step: int, stop_requested: bool = False):
        """One critic update (+ one generator update every n_critic steps).

        Returns (stats: dict of float, bad: bool, stop: bool); `bad` and `stop` are agreed by all ranks.
        """
        env, obj = self.env, self.obj
        gen = step_generator(self.seed, env.rank, step, env.device)
        n = real.shape[0]
        real = real.contiguous(memory_format=self.memory_format)

        # critic: D(real), D(fake.detach()), gradient penalty -> one backward
        lat = sample_latent(self.spec, n, gen, num_classes=self.num_classes, labels=self.labels, device=env.device)
        with torch.no_grad():
            fake, fake_low = obj.fakes(self.G, lat)
        self.opt_D.zero_grad(set_to_none=True)
        scale = self.scaler_D.get_scale() if self.scaler_D else None
        d_loss, stats = obj.critic_loss(self.D, real, y, fake, lat, gen, scale, step=step, fake_low=fake_low)
        self._backward(d_loss, self.scaler_D)
        flags = torch.stack([self._local_bad(d_loss, self.D, self.opt_D, self.scaler_D).float(),
                             torch.tensor(float(stop_requested), device=d_loss.device)])
        bad_d, stop = (bool(v) for v in dist.all_reduce_max(env, flags).tolist())
        self._apply(bad_d, self.opt_D, self.scaler_D)
        if not bad_d:
            obj.clip_critic(unwrap(self.D))

        # generator: D's parameters frozen and its DDP sync off (its gradients are not wanted here)
        bad_g = False
        if (step + 1) % self.n_critic == 0:
            lat = sample_latent(self.spec, n, gen, num_classes=self.num_classes, labels=self.labels,
                                pairs=self.spec.mode_seeking > 0, twins=self.spec.noisy_twins > 0, device=env.device)
            self.opt_G.zero_grad(set_to_none=True)
            unwrap(self.D).requires_grad_(False)
            no_sync = self.D.no_sync() if isinstance(self.D, DDP) else contextlib.nullcontext()
            try:
                with no_sync:
                    fake, fake_low = obj.fakes(self.G, lat)
                    g_loss, g_stats = obj.generator_loss(self.D, fake, lat, gen, y, G=unwrap(self.G),
                                                         fake_low=fake_low)
                    self._backward(g_loss, self.scaler_G)
            finally:
                unwrap(self.D).requires_grad_(True)
            stats.update(g_stats)
            flag = self._local_bad(g_loss, self.G, self.opt_G, self.scaler_G).float().reshape(1)
            bad_g = bool(dist.all_reduce_max(env, flag).item())
            self._apply(bad_g, self.opt_G, self.scaler_G)
            if self.G_ema is not None and not bad_g:  # the warm-up clock: generator updates, a function of step
                update_ema(self.G_ema, unwrap(self.G), ema_beta(self.ema_decay, self.ema_rampup,
                                                                (step + 1) // self.n_critic))
                self.ema_standing = False
        return stats, bad_d or bad_g, stop

    @torch.no_grad()
    def ranks_in_sync(self) -> bool:
        """Whether every rank holds the same G and D parameters (DDP keeps them identical bit for bit)."""
        params = [p for m in (self.G, self.D) for p in unwrap(m).parameters()]
        digest = torch.stack([p.double().sum() for p in params]).sum()
        both = dist.all_reduce_max(self.env, torch.stack([digest, -digest]))
        return bool(both[0] == -both[1])

    def ema_generator(self) -> nn.Module | None:
        """G_ema ready for use (sample grids, checkpoints and so generation): its BatchNorm standing statistics
        recomputed when its weights changed since they were last computed. None without EMA."""
        if self.G_ema is not None and not self.ema_standing:
            batches, batch_size = self.standing
            standing_stats(self.G_ema, self.spec, self.num_classes, batches=batches, batch_size=batch_size,
                           seed=self.seed, device=self.env.device, labels=self.labels)
            self.ema_standing = True
        return self.G_ema

    # checkpoint state
    def state_dict(self) -> dict:
        """G_ema_bn "standing": G_ema's BatchNorm statistics are its own (checkpoints before issue 9 hold the
        live generator's; hpcgan.generate recomputes them)."""
        scalers = None
        if self.scaler_G is not None:
            scalers = {"G": self.scaler_G.state_dict(), "D": self.scaler_D.state_dict()}
        G_ema = self.ema_generator()
        return {"G": unwrap(self.G).state_dict(), "D": unwrap(self.D).state_dict(),
                "G_ema": G_ema.state_dict() if G_ema is not None else None,
                "G_ema_bn": "standing" if G_ema is not None else None,
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "scaler": scalers}

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.G).load_state_dict(state["G"])
        unwrap(self.D).load_state_dict(state["D"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(state["G_ema"] if state["G_ema"] is not None else state["G"])
            self.ema_standing = state["G_ema"] is not None and state.get("G_ema_bn") == "standing"
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        for net, opt in (("G", self.opt_G), ("D", self.opt_D)):  # the config's lr wins (no schedules here)
            for group in opt.param_groups:
                group["lr"] = optimiser_lr(self.spec.optim, net)
        if self.scaler_G is not None and state.get("scaler"):
            self.scaler_G.load_state_dict(state["scaler"]["G"])
            self.scaler_D.load_state_dict(state["scaler"]["D"])

    @torch.no_grad()
    def sample_grid(self, per_class: int) -> torch.Tensor:
        """Fixed-noise samples, one row per class (per categorical code for InfoGAN-style models)."""
        spec = self.spec
        row = torch.arange(self.num_classes).repeat_interleave(per_class)
        latent = sample_latent(spec, len(row), torch.Generator().manual_seed(self.seed), device=self.env.device,
                               y=row if spec.conditional else None, cat=row % spec.info_cat if spec.info_cat else None)
        G = self.ema_generator() if self.G_ema is not None else unwrap(self.G)
        was_training = G.training
        G.eval()
        try:
            return G(latent.z, latent.y).float().cpu()
        finally:
            G.train(was_training)


# ---- pictures and tensorboard --------------------------------------------------------------------------

def save_grid(images: torch.Tensor, per_row: int, path: Path, row_labels: list[str] | None = None,
              marked: list[int] = ()) -> None:
    """Samples as they are ([-1, 1] -> 0..255, no per-grid rescaling), a row per class, the class named;
    `marked` rows (classes without training images) greyed and crossed out."""
    from hpcgan.viz import image_grid, save_png
    save_png(image_grid(images, per_row, labels=row_labels, marked=marked), path)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}"  # non-finite values show as nan / inf


def _tensorboard(mode, run_dir: Path):
    if str(mode).lower() in ("false", "0", "none", "off"):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(run_dir / "tb"))
    except ImportError:
        if str(mode).lower() == "true":
            logger.warning("tensorboard=true but the tensorboard package is not installed; logging to log.csv only")
        return None


# ---- the training run --------------------------------------------------------------------------------

def run(cfg: TrainSettings | dict, clock=time.monotonic) -> int:
    """Train per `cfg` (TrainSettings, or a mapping of configs/train.yaml's keys). Returns the exit code
    (see the module docstring). `clock`: seconds, read once when the loop starts and once after every step;
    the training time and the time budget count in it (tests give one that advances a fixed amount a call)."""
    settings = cfg if isinstance(cfg, TrainSettings) else parse(TrainSettings, cfg)
    env = dist.init(settings.device)
    job = TrainingRun(settings, env, clock)
    try:
        return job.run()
    except _Diverged as e:
        logger.error("%s", e)
        job.mark_failed(e)
        return EXIT_FAILED
    except Exception as e:
        job.mark_failed(e)
        raise
    finally:
        job.close()
        dist.cleanup(env)


class _Diverged(RuntimeError):
    pass


class TrainingRun:
    """One run of run() in its run directory: setup, resume, the loop, the finish. Rank 0 writes the run
    directory (hpcgan.rundir); every rank trains and checkpoints at the same steps."""

    def __init__(self, settings: TrainSettings, env: dist.DistEnv, clock=time.monotonic):
        self.s, self.env, self.clock = settings, env, clock
        self.stop_flag = dist.StopFlag()
        self.run_dir = Path(settings.run_dir).resolve()
        self.shards = _resolved(settings.shards)
        self.status_fields: dict = {}
        self.trainer = self.probe = self.batches = self.pbar = self.log = self.diversity_log = self.tb = None

    def run(self) -> int:
        self.setup()
        ckpt = self.newest_checkpoint()
        if self.step >= self.total or self.budget_spent_by(ckpt):
            return self.already_finished()
        try:
            self.resume(ckpt)
        except AutoencoderStopped as e:
            return self.stopped_before_training(e)
        del ckpt
        self.open_outputs()
        if self.loop():
            return self.interrupted()
        self.finish()
        return EXIT_OK

    # ---- setup: what this run is, before any work
    def setup(self) -> None:
        s, env = self.s, self.env
        self.spec = s.spec
        resolve_precision(s.precision, env.device)  # fail early, before any work, on a precision the device lacks
        configure_backends(env.device, cudnn_benchmark=s.cudnn_benchmark, tf32=s.tf32)
        self.index, self.scarce_record = self.training_samples()
        self.probe = self.loader(0)
        self.classes, self.image_size = list(self.probe.classes), int(self.probe.image_size)
        self.epoch_batches = self.probe.epoch_batches
        if self.epoch_batches < 1:
            raise ValueError(f"{self.shards}: split {s.split!r} has no samples to train on")
        self.total = self.planned = s.steps or s.epochs * self.epoch_batches
        # what the generator can learn of each class: its images in the split(s) trained on (hpcgan.generate
        # refuses a class without any; sample grids mark its row)
        counts = np.bincount(self.probe.index.labels, minlength=len(self.classes)).tolist()
        self.class_counts = dict(zip(self.classes, counts))
        self.run_config = {**asdict(s), "shards": self.shards, "run_dir": str(self.run_dir), "model": asdict(self.spec),
                           "classes": self.classes, "num_classes": len(self.classes), "class_counts": self.class_counts,
                           "image_size": self.image_size, "steps": self.total, "world_size": env.world_size}
        self.status_fields = {"steps": self.total, "model": self.spec.name, "world_size": env.world_size}
        # what fixes the order of batches within an epoch; a resume with any of it changed restarts the epoch
        self.data_order = {"shards": self.shards, "split": s.split, "batch_size": s.batch_size, "seed": s.seed,
                           "world_size": env.world_size, "balance_classes": s.balance_classes,
                           **({"scarce": s.scarce, "scarce_seed": s.scarce_seed} if s.scarce else {})}

    def training_samples(self):
        """(the samples trained on, the scarce cut's record): the whole split, or with scarce= the cut
        (hpcgan.data.scarce, the same as the study's classifiers make)."""
        from hpcgan.data.scarce import ScarceError, cut_split
        if not self.s.scarce:
            return None, {}
        try:
            return cut_split(self.shards, self.s.split, self.s.scarce, self.s.scarce_seed)
        except ScarceError as e:
            raise SettingsError(str(e)) from None

    def loader(self, epoch: int, skip: int = 0, balance: bool | None = None, whole: bool = False):
        """One epoch of the training samples for this rank; balance: class-balanced draws (default: the
        balance_classes setting); whole: every sample for every rank (as rank 0 of 1), padded at the end only."""
        from hpcgan.data.loader import make_loader
        s, env = self.s, self.env
        balance = s.balance_classes if balance is None else balance
        rank, world = (0, 1) if whole else (env.rank, env.world_size)
        return make_loader(self.shards, s.split, s.batch_size, rank, world, seed=s.seed, epoch=epoch,
                           shuffle=True, flip=s.flip, balance_classes=balance, backend=s.backend,
                           device=env.device.type, num_threads=s.num_threads, skip_batches=skip, index=self.index)

    # ---- resume: the newest valid checkpoint, if any, on every rank
    def newest_checkpoint(self) -> dict | None:
        ckpt, self.ckpt_path = resume_point(
            self.run_dir, self.env, map_location=self.env.device,
            none_loads="loads (see the warnings); refusing to start over and overwrite them: move them away or "
                       "use a new run_dir")
        self.step = int(ckpt["step"]) if ckpt else 0
        if ckpt is not None:
            _check_compatible(ckpt["config"], self.run_config, self.run_dir)
        return ckpt

    def budget_spent_by(self, ckpt: dict | None) -> bool:
        """Whether the checkpoint resumed from already holds time_budget_s of training (a run the budget ended)."""
        budget = self.s.time_budget_s
        return ckpt is not None and budget is not None and float(ckpt["meta"].get("train_seconds", 0.0)) >= budget

    def already_finished(self) -> int:
        why = f"time_budget_s={self.s.time_budget_s:g} spent" if self.step < self.total else "all steps done"
        msg = f"{self.run_dir} already finished ({self.step}/{self.total} steps, {why}); nothing to do"
        if self.env.is_main:
            print(msg, flush=True)
            write_status(self.run_dir, {**read_status(self.run_dir), "state": "finished", "step": self.step,
                                        "steps": self.total})
        logger.info(msg)
        return EXIT_OK

    def resume(self, ckpt: dict | None) -> None:
        s = self.s
        self.ae_seconds = 0.0
        pretrain = self.autoencoder_init if ckpt is None and self.spec.ae_init > 0 else None
        self.trainer = Trainer(self.spec, len(self.classes), self.image_size, self.env, seed=s.seed,
                               precision=s.precision, ema=s.ema, ema_rampup=s.ema_rampup,
                               standing=(s.ema_standing_batches, s.batch_size), diffaug=s.diffaug or (),
                               channels_last=s.channels_last,
                               labels=[i for i, c in enumerate(self.classes) if self.class_counts[c] > 0],
                               class_counts=[self.class_counts[c] for c in self.classes], pretrain=pretrain)
        self.epoch, self.in_epoch, self.train_seconds = 0, 0, self.ae_seconds
        if ckpt is None:
            return
        self.trainer.load_state_dict(ckpt)
        restore_rng(ckpt["rng"])
        self.epoch, self.in_epoch = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        self.train_seconds = float(ckpt["meta"].get("train_seconds", 0.0))
        saved = ckpt["meta"].get("data_order") or {"world_size": ckpt["meta"].get("world_size", self.env.world_size)}
        changed = {k: (v, self.data_order.get(k)) for k, v in saved.items() if self.data_order.get(k) != v}
        if changed:  # the saved position counts batches of another order: it would land somewhere arbitrary
            logger.warning("resuming with a different data order (%s): epoch %d is restarted from its first batch",
                           "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), self.epoch)
            self.in_epoch = 0
        logger.info("resuming from %s (step %d, epoch %d, batch %d)", self.ckpt_path, self.step, self.epoch,
                    self.in_epoch)

    def autoencoder_init(self, G: nn.Module, D: nn.Module) -> None:
        """BAGAN (model.ae_init; hpcgan.models.bagan) on a fresh run: the autoencoder on the training images at
        their natural rate (epochs of the unbalanced order), then the latent prior from one pass; its record in
        ae_init.json. Its time counts against time_budget_s; a resumed run has it in its checkpoint."""
        from hpcgan.models.bagan import autoencoder_init

        def epochs():
            epoch = 0
            while True:
                yield from self.loader(epoch, balance=False)
                epoch += 1
        record = autoencoder_init(G, D, epochs(), self.loader(0, balance=False, whole=True),
                                  int(sum(self.class_counts.values())), self.spec.ae_init, self.env, self.clock,
                                  stop_requested=lambda: self.stop_flag.requested)
        self.ae_seconds = record["seconds"]
        logger.info("BAGAN autoencoder: %d steps, reconstruction MSE %.4f -> %.4f, prior from %d codes, %.1f s",
                    record["steps"], record["mse_first"], record["mse_last"], record["codes_fitted"],
                    record["seconds"])
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "ae_init.json", record)

    def open_outputs(self) -> None:
        s, run_dir = self.s, self.run_dir
        if self.env.is_main:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            write_config(run_dir, self.run_config)
            if self.scarce_record:
                write_json(run_dir / "scarce.json", self.scarce_record)
            self.write_status("running")
            self.log = CsvLog(run_dir / LOG, LOG_COLUMNS, self.step)
            self.diversity_log = CsvLog(run_dir / "samples" / "diversity.csv", DIVERSITY_COLUMNS, self.step)
            self.tb = _tensorboard(s.tensorboard, run_dir)
            self.pbar = Progress(self.total, f"train {self.spec.name}", "step", bar=s.progress, initial=self.step)
        dist.barrier(self.env)

    # ---- the loop
    def loop(self) -> bool:
        """Train to `total` steps; True when a stop signal ended it early."""
        s = self.s
        self.t0, self.t_log = self.clock(), time.time()
        self.now = self.train_seconds
        self.n_log, self.bad_streak, self.stats = 0, 0, {}
        self.last_ckpt = self.step if self.step > 0 else -1
        self.batches = iter(self.loader(self.epoch, min(self.in_epoch, self.epoch_batches)))
        while self.step < self.total:
            stop = self.train_step(*self.next_batch())
            if self.budget_reached():
                self.total = self.step   # the run ends here, finished (status.json says by the budget)
            diverged = self.bad_streak >= s.max_bad_steps
            if self.step % s.log_every == 0 or self.step == self.total or diverged:
                self.log_row()
            if diverged:
                intact = f"Checkpoints up to step {self.last_ckpt} are intact; " if self.last_ckpt > 0 else ""
                raise _Diverged(f"{self.bad_streak} consecutive non-finite steps (max_bad_steps={s.max_bad_steps}) "
                                f"at step {self.step}: the run diverged. {intact}lower model.optim.lr or use "
                                "precision=fp32")
            if s.sample_every and self.step % s.sample_every == 0:
                self.samples()
            if stop and self.step < self.total:   # at the budget's last step a stop signal just finishes
                return True
            if self.step % s.ckpt_every == 0 and self.bad_streak == 0 and self.step < self.total:
                self.checkpoint()
                self.last_ckpt = self.step
        return False

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            try:
                return next(self.batches)
            except StopIteration:  # same len on every rank: all ranks turn the epoch together
                self.epoch, self.in_epoch = self.epoch + 1, 0
                self.batches = iter(self.loader(self.epoch))

    def train_step(self, real: torch.Tensor, y: torch.Tensor) -> bool:
        """One step; whether the ranks agreed to stop after it."""
        step_stats, bad, stop = self.trainer.step(real, y, self.step, self.stop_flag.requested)
        self.in_epoch += 1
        self.step += 1
        self.n_log += real.shape[0]
        self.stats.update(step_stats)
        self.bad_streak = self.bad_streak + 1 if bad else 0
        if bad:
            logger.warning("step %d: non-finite loss or gradient on some rank; update skipped (%d in a row)",
                           self.step, self.bad_streak)
        if self.pbar is not None:
            self.pbar.update(1)
        return stop

    def elapsed(self) -> float:
        """Training seconds of the whole run, across resumes, as of the last step (see budget_reached)."""
        return self.now

    def budget_reached(self) -> bool:
        """Reads the clock (once a step) and says whether time_budget_s is spent. With a budget the ranks agree
        on the time itself (the largest of their clocks), so they stop after the same step and every checkpoint
        holds the time that stopped them: a rerun then knows the budget is spent."""
        self.now = self.train_seconds + self.clock() - self.t0
        if self.s.time_budget_s is None:
            return False
        now = torch.tensor([self.now], dtype=torch.float64, device=self.env.device)
        self.now = float(dist.all_reduce_max(self.env, now).item())
        return self.now >= self.s.time_budget_s

    def log_row(self) -> None:
        """The ranks' mean statistics since the last row -> log.csv (and tensorboard, the bar, status.json)."""
        env, keys = self.env, sorted(self.stats)
        vals = dist.all_reduce_mean(env, torch.stack([self.stats[k].float() for k in keys])).tolist()
        row = {k: _fmt(v) for k, v in zip(keys, vals)}
        dt = time.time() - self.t_log
        row.update(step=self.step, epoch=self.epoch, time=_fmt(self.elapsed()),
                   images_per_s=_fmt(self.n_log * env.world_size / max(dt, 1e-9)),
                   lr=_fmt(self.trainer.opt_D.param_groups[0]["lr"]), bad_steps=self.bad_streak)
        self.t_log, self.n_log = time.time(), 0
        if not env.is_main:
            return
        self.log.write(row)
        if self.tb is not None:
            for k, v in zip(keys, vals):
                self.tb.add_scalar(f"train/{k}", v, self.step)
        if self.pbar is not None:
            self.pbar.set_postfix(d=row.get("d_loss"), g=row.get("g_loss"))
        self.write_status("running")

    # ---- outputs at a step
    def checkpoint(self) -> Path | None:
        env, step = self.env, self.step
        if env.distributed and not self.trainer.ranks_in_sync():
            logger.warning("step %d: G/D parameters differ between ranks (gradient sync broken?); "
                           "the checkpoint holds rank 0's", step)
        path = None
        if env.is_main:
            state = {"step": step, "epoch": self.epoch, "batch_in_epoch": self.in_epoch, "config": self.run_config,
                     **self.trainer.state_dict(), "rng": capture_rng(),
                     "meta": {"world_size": env.world_size, "data_order": self.data_order,
                              "train_seconds": self.elapsed(), "torch": str(torch.__version__), "time": time.time()}}
            path = save_checkpoint(self.run_dir, state, keep_last=self.s.keep_last)
        dist.barrier(env)  # nobody leaves before the checkpoint is on disk
        return path

    def samples(self) -> None:
        """samples/step-N.png, its diversity gauge (samples/diversity.csv) and curves.png, on rank 0."""
        if not self.env.is_main:
            return
        spec, k, step, run_dir = self.spec, self.s.samples_per_class, self.step, self.run_dir
        unseen = unseen_classes(self.class_counts, self.classes) if spec.conditional else []
        labels = ([f"{c} ({NO_TRAINING_IMAGES})" if c in unseen else c for c in self.classes] if spec.conditional else
                  [f"code {i}" for i in range(self.trainer.num_classes)] if spec.info_cat else None)
        grid = self.trainer.sample_grid(k)
        save_grid(grid, k, run_dir / "samples" / f"step-{step:08d}.png", labels,
                  marked=[self.classes.index(c) for c in unseen])
        div = grid_diversity(grid, k)
        self.diversity_log.write({"step": step, **{c: _fmt(v) for c, v in div.items()}})
        if self.tb is not None:
            for c, v in div.items():
                self.tb.add_scalar(f"samples/{c}", v, step)
        try:  # a picture is not worth a failed run
            from hpcgan.viz import training_curves
            training_curves(run_dir, run_dir / "curves.png", f"{spec.name}: {run_dir.name}")
        except Exception as e:  # noqa: BLE001
            logger.warning("curves.png not drawn: %s: %s", type(e).__name__, e)

    def write_status(self, state: str, **extra) -> None:
        write_status(self.run_dir, {"state": state, "step": self.step, **self.status_fields, **extra})

    # ---- the ends of a run
    def interrupted(self) -> int:
        """Stopped by a signal: checkpoint and samples at this step, status "interrupted"."""
        self.checkpoint()
        self.samples()
        return self.stop_flag.leave(self.env, self.write_status, self.step, self.total)

    def stopped_before_training(self, e: Exception) -> int:
        """Stopped by a signal before the first GAN step (BAGAN's autoencoder): nothing to checkpoint; status
        "interrupted" at step 0, and a rerun starts afresh."""
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.stop_flag.leave(self.env, lambda state, **kw: self.write_status(state, phase="autoencoder", **kw),
                                    0, self.total, done=f"{e}; no checkpoint yet; rerun to start again")

    def finish(self) -> None:
        """The last checkpoint and samples, the class check, status "finished"."""
        s = self.s
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        self.checkpoint()
        if not (s.sample_every and self.step % s.sample_every == 0):
            self.samples()
        if self.env.is_main:
            signal = self.class_signal()
            extra = {"class_signal": signal} if signal is not None else {}
            if self.step < self.planned:   # the step reached is what repeats this run by steps
                extra["time_budget"] = {"seconds": s.time_budget_s, "elapsed_s": round(self.now, 3),
                                        "step_reached": self.step, "steps_planned": self.planned}
                logger.info("time_budget_s=%g spent after step %d of %d", s.time_budget_s, self.step, self.planned)
            self.write_status("finished", **extra)
        logger.info("finished %d steps in %s", self.step, self.run_dir)
        dist.barrier(self.env)  # leave together: a rank tearing gloo down while rank 0 still writes aborted (rc -6)

    def class_signal(self) -> dict | None:
        """gauges.class_signal of log.csv, with a warning when the critic does not know the classes."""
        from hpcgan.viz import read_columns
        signal = class_signal([v for _, v in read_columns(self.run_dir / LOG).get("ac_acc_real", [])],
                              list(self.class_counts.values()), self.s.balance_classes)
        if signal is not None and not signal["learnt"]:
            logger.warning("auxiliary classifier on real images: accuracy %.2f over the last %d log rows "
                           "(chance %.2f): %s", signal["accuracy"], signal["rows"], signal["chance"],
                           CLASS_SIGNAL_ADVICE)
        return signal

    def mark_failed(self, err: Exception) -> None:
        if self.env.is_main and self.run_dir.is_dir():
            write_status(self.run_dir, {**read_status(self.run_dir), **self.status_fields, "state": "failed",
                                        "error": f"{type(err).__name__}: {err}"})

    def close(self) -> None:
        self.stop_flag.restore()
        if self.pbar is not None:
            self.pbar.close()
        # Tear down in a fixed order: DDP wrappers (which hold the process group) and loader iterators go
        # before the process group, not whenever the garbage collector or interpreter exit gets to them
        # (a gloo group freed during interpreter shutdown aborted a rank now and then: rc -6, "terminate
        # called without an active exception").
        self.trainer = self.probe = self.batches = None
        gc.collect()


def _resolved(shards) -> str | list[str]:
    if isinstance(shards, (list, tuple)):
        return [str(Path(p).resolve()) for p in shards]
    return str(Path(shards).resolve())


_MUST_MATCH = ("name", "generator", "critic", "conditional", "critic_condition", "z_dim", "width", "class_from",
               "info_cat", "info_cont", "critic_norm", "ac_twin", "spectral_norm", "twin_sigma")


def _architecture(model: dict) -> dict:
    """What a checkpoint's weights are of: the spec keys that shape them (a key newer than the checkpoint: its
    default), and whether NoisyTwins' mapping, BAGAN's prior and UTLO's low-resolution layers are there (their weight
    and steps may change, their presence may not)."""
    defaults = field_defaults(GANSpec)
    arch = {f"model.{k}": model.get(k, defaults.get(k)) for k in _MUST_MATCH}
    arch["model.noisy_twins > 0"] = float(model.get("noisy_twins", defaults["noisy_twins"])) > 0
    arch["model.ae_init > 0"] = int(model.get("ae_init", defaults["ae_init"])) > 0
    arch["model.utlo_alpha > 0"] = float(model.get("utlo_alpha", defaults["utlo_alpha"])) > 0
    return arch


def _check_compatible(saved: dict, now: dict, run_dir: Path) -> None:
    old, new = _architecture(saved["model"]), _architecture(now["model"])
    diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
    diffs += [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in ("classes", "image_size", "scarce", "scarce_seed")
              if saved.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"{run_dir} holds checkpoints of a different model/data ({'; '.join(diffs)}); "
                         "use a new run_dir or the original settings")


def check_inputs(s: TrainSettings) -> None:
    """Every shard set given is one (its manifest.json), before a process group or model is made."""
    for d in s.shards if isinstance(s.shards, (list, tuple)) else [s.shards]:
        if not (Path(d) / "manifest.json").is_file():
            what = "does not exist" if not Path(d).exists() else "is not a shard set (no manifest.json)"
            raise SettingsError(f"shards={d} {what}; build one with tools/shard.py")


def _setup_logging() -> None:
    rank = dist.launch_env()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def hydra_task(cfg) -> None:
    """One training from a composed Hydra config: `python -m hpcgan.train ...`, and each job of a multirun
    (`-m model=wgan_gp_ac,dcgan seed=0,1 hydra/launcher=submitit_slurm`: one Slurm array)."""
    _setup_logging()
    with exit_on_error("hpcgan.train"):
        settings = parse(TrainSettings, cfg)
        check_inputs(settings)
    code = run(settings)
    if code != EXIT_OK:
        sys.exit(code)


def _hydra_main():
    import hydra

    from hpcgan import CONFIG_DIR
    # the task by its importable name, not __main__'s copy: submitit pickles it by reference, so a launcher
    # job imports hpcgan.train instead of unpickling this module's globals
    from hpcgan.train import hydra_task as task
    hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)(task)()


if __name__ == "__main__":
    _hydra_main()
