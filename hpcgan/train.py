"""Train a GAN (WGAN-GP-AC or a baseline) on shards, with DDP and mixed precision, resumably.

    torchrun --standalone --nproc_per_node=N -m hpcgan.train shards=DIR run_dir=DIR model=wgan_gp_ac steps=N
    srun python -m hpcgan.train ...        (Slurm tasks as ranks; see hpcgan/dist.py)
    python -m hpcgan.train ...             (one process)

Config: configs/train.yaml (+ configs/model/<model>.yaml for the architecture, loss and optimiser).
One step = one batch per rank = one critic update; the generator is updated every `n_critic` steps.
All randomness of step s on rank r (noise, labels, codes, penalty interpolation, DiffAugment) comes from a
generator seeded by (seed, r, s), and the loader's order is a function of (seed, epoch, rank), so a run
resumed from a checkpoint repeats exactly what the uninterrupted run would have done.

Run directory: config.yaml, log.csv, curves.png (log.csv and the sample diversity drawn, at every sample
grid), samples/step-N.png, samples/diversity.csv, checkpoints/step-N.pt, status.json
({"state": "running" | "finished" | "failed" | "interrupted", "step", "steps", ...; a finished run with an
auxiliary classifier adds "class_signal", see class_signal()}).

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
import csv
import gc
import hashlib
import inspect
import io
import json
import logging
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hpcgan import dist
from hpcgan.checkpoint import capture_rng, list_checkpoints, load_latest, restore_rng, save_checkpoint
from hpcgan.fsutil import atomic_write_bytes
from hpcgan.objectives import STAT_KEYS, GANObjective
from hpcgan.models.registry import GANSpec, build_model

logger = logging.getLogger("hpcgan.train")

EXIT_OK, EXIT_FAILED, EXIT_SIGNAL = 0, 1, 3
LOG_COLUMNS = ("step", "epoch", "time", *STAT_KEYS, "images_per_s", "lr", "bad_steps")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


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


def make_optimizer(params, optim: dict) -> torch.optim.Optimizer:
    name = optim.get("name", "adam")
    if name == "adam":
        return torch.optim.Adam(params, lr=optim["lr"], betas=tuple(optim.get("betas", (0.5, 0.999))))
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=optim["lr"])
    raise ValueError(f"model.optim.name={name!r}: choose adam or rmsprop")


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def grads_finite(module: nn.Module) -> torch.Tensor:
    """Whether every gradient is finite, as a device tensor (one fused norm: no per-parameter kernels)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.nn.utils.get_total_norm(grads, foreach=True).isfinite()


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, DDP) else m


# ---- the model pair, its optimisers and one training step -------------------------------------------

class Trainer:
    """G, D (DDP-wrapped when distributed), EMA, optimisers, scalers, and `step()`."""

    def __init__(self, spec: GANSpec, num_classes: int, image_size: int, env: dist.DistEnv, *, seed: int,
                 precision: str = "fp32", ema: float = 0.0, diffaug: str = "", channels_last: bool = False):
        self.spec, self.env, self.seed = spec, env, seed
        # NHWC: what tensor-core convs (cuDNN) and oneDNN want; NCHW makes them transpose around every conv.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.num_classes, self.image_size = num_classes, image_size
        dtype, use_scaler = resolve_precision(precision, env.device)
        self.obj = GANObjective(spec, num_classes, diffaug=diffaug, device_type=env.device.type,
                                autocast_dtype=dtype)
        torch.manual_seed(seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        G, D = build_model(spec, num_classes, image_size)
        G = G.to(env.device, memory_format=self.memory_format)
        D = D.to(env.device, memory_format=self.memory_format)
        self.G_ema = copy.deepcopy(G).eval().requires_grad_(False) if ema > 0 else None
        self.ema_decay = ema
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
        self.n_critic = int(spec.optim.get("n_critic", 1))
        self.opt_G = make_optimizer(unwrap(G).parameters(), spec.optim)
        self.opt_D = make_optimizer(unwrap(D).parameters(), spec.optim)
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
        lat = obj.sample_latent(n, gen, env.device)
        with torch.no_grad(), obj.autocast():
            fake = self.G(lat.z, lat.y)
        self.opt_D.zero_grad(set_to_none=True)
        scale = self.scaler_D.get_scale() if self.scaler_D else None
        d_loss, stats = obj.critic_loss(self.D, real, y, fake.float(), lat, gen, scale, step=step)
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
            lat = obj.sample_latent(n, gen, env.device)
            self.opt_G.zero_grad(set_to_none=True)
            unwrap(self.D).requires_grad_(False)
            no_sync = self.D.no_sync() if isinstance(self.D, DDP) else contextlib.nullcontext()
            try:
                with no_sync:
                    with obj.autocast():
                        fake = self.G(lat.z, lat.y)
                    g_loss, g_stats = obj.generator_loss(self.D, fake.float(), lat, gen, y)
                    self._backward(g_loss, self.scaler_G)
            finally:
                unwrap(self.D).requires_grad_(True)
            stats.update(g_stats)
            flag = self._local_bad(g_loss, self.G, self.opt_G, self.scaler_G).float().reshape(1)
            bad_g = bool(dist.all_reduce_max(env, flag).item())
            self._apply(bad_g, self.opt_G, self.scaler_G)
            if self.G_ema is not None and not bad_g:
                update_ema(self.G_ema, unwrap(self.G), self.ema_decay)
        return stats, bad_d or bad_g, stop

    @torch.no_grad()
    def ranks_in_sync(self) -> bool:
        """Whether every rank holds the same G and D parameters (DDP keeps them identical bit for bit)."""
        params = [p for m in (self.G, self.D) for p in unwrap(m).parameters()]
        digest = torch.stack([p.double().sum() for p in params]).sum()
        both = dist.all_reduce_max(self.env, torch.stack([digest, -digest]))
        return bool(both[0] == -both[1])

    # checkpoint state
    def state_dict(self) -> dict:
        scalers = None
        if self.scaler_G is not None:
            scalers = {"G": self.scaler_G.state_dict(), "D": self.scaler_D.state_dict()}
        return {"G": unwrap(self.G).state_dict(), "D": unwrap(self.D).state_dict(),
                "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "scaler": scalers}

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.G).load_state_dict(state["G"])
        unwrap(self.D).load_state_dict(state["D"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(state["G_ema"] if state["G_ema"] is not None else state["G"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        for opt in (self.opt_G, self.opt_D):  # the config's lr wins over the saved one (no schedules here)
            for group in opt.param_groups:
                group["lr"] = self.spec.optim["lr"]
        if self.scaler_G is not None and state.get("scaler"):
            self.scaler_G.load_state_dict(state["scaler"]["G"])
            self.scaler_D.load_state_dict(state["scaler"]["D"])

    @torch.no_grad()
    def sample_grid(self, per_class: int) -> torch.Tensor:
        """Fixed-noise samples, one row per class (per categorical code for InfoGAN-style models)."""
        spec, rows = self.spec, self.num_classes
        g = torch.Generator().manual_seed(self.seed)
        n = rows * per_class
        row = torch.arange(rows).repeat_interleave(per_class)
        parts = [torch.randn(n, spec.z_dim, generator=g)]
        if spec.info_cat > 0:
            parts.append(nn.functional.one_hot(row % spec.info_cat, spec.info_cat).float())
        if spec.info_cont > 0:
            parts.append(torch.rand(n, spec.info_cont, generator=g) * 2 - 1)
        z = torch.cat(parts, 1).to(self.env.device)
        y = row.to(self.env.device) if spec.conditional else None
        G = self.G_ema if self.G_ema is not None else unwrap(self.G)
        was_training = G.training
        G.eval()
        try:
            return G(z, y).float().cpu()
        finally:
            G.train(was_training)


# ---- run directory: status, log, samples, config -----------------------------------------------------

def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def save_grid(images: torch.Tensor, per_row: int, path: Path, row_labels: list[str] | None = None) -> None:
    """Samples as they are ([-1, 1] -> 0..255, no per-grid rescaling), a row per class, the class named."""
    from hpcgan.viz import image_grid, save_png
    save_png(image_grid(images, per_row, labels=row_labels), path)


def data_diversity(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mode-collapse gauge of labelled images: within_row_std = per-pixel std within each class (classes with
    >= 2 images), averaged; between_row_std = per-pixel std of the class means. For real images it is the
    reference to read a sample grid's numbers against."""
    groups = [images[labels == c].float() for c in labels.unique()]
    within = [g.std(0).mean().item() for g in groups if len(g) > 1]
    means = torch.stack([g.mean(0) for g in groups])
    return {"within_row_std": sum(within) / len(within) if within else float("nan"),
            "between_row_std": means.std(0).mean().item() if len(groups) > 1 else float("nan")}


def grid_diversity(images: torch.Tensor, per_row: int) -> dict[str, float]:
    """The gauge of a sample grid (one row per class, a different noise vector per column): near 0 within
    rows, the generator ignores its noise; near 0 between rows, it ignores the class."""
    rows = torch.arange(images.shape[0] // per_row).repeat_interleave(per_row)
    return data_diversity(images, rows)


def class_signal(acc_real: list[float], class_counts: list[int], balanced: bool, last_rows: int = 4) -> dict | None:
    """Whether the critic's auxiliary classifier tells the classes of real images apart: the mean of the last
    logged accuracies against chance, i.e. always naming the largest class (1/classes under balanced
    sampling). Without it the generator gets no class signal. None for a model without a classifier."""
    if not acc_real:
        return None
    present = [c for c in class_counts if c > 0]
    chance = 1 / len(present) if balanced else max(present) / sum(present)
    tail = acc_real[-last_rows:]
    accuracy = sum(tail) / len(tail)
    return {"accuracy": accuracy, "chance": chance, "rows": len(tail),
            "learnt": accuracy >= chance + 0.25 * (1 - chance)}


CLASS_SIGNAL_ADVICE = ("the critic does not tell the classes apart yet, so the generator gets no class signal; "
                       "train longer or raise model.ac_weight (README, Known limitations)")


DIVERSITY_COLUMNS = ("step", "within_row_std", "between_row_std")


class CsvLog:
    """A CSV with fixed columns; on resume, rows after the resumed step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int, columns: tuple[str, ...] = LOG_COLUMNS):
        self.path, self.columns = path, columns
        rows = []
        if path.is_file() and resume_step > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in self.columns} for r in rows)
        atomic_write_bytes(path, buf.getvalue().encode())

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: row.get(k, "") for k in self.columns})


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

def run(cfg: dict) -> int:
    """Train per `cfg` (a plain dict: configs/train.yaml resolved). Returns the exit code (see module doc)."""
    from hpcgan.data.loader import make_loader

    env = dist.init(cfg.get("device", "auto"))
    stop_flag = dist.StopFlag()
    run_dir = Path(cfg["run_dir"]).resolve()
    shards = cfg["shards"]
    shards = [str(Path(s).resolve()) for s in shards] if isinstance(shards, (list, tuple)) else str(Path(shards).resolve())
    state_fields = {}
    trainer = probe = batches = None
    try:
        spec = GANSpec.from_config(cfg["model"])
        resolve_precision(cfg["precision"], env.device)  # fail early, before any work, on a bad precision
        configure_backends(env.device, cudnn_benchmark=cfg.get("cudnn_benchmark", True), tf32=cfg.get("tf32", True))
        batch = int(cfg["batch_size"])

        def loader(epoch: int, skip: int = 0):
            return make_loader(shards, cfg.get("split", "train"), batch, env.rank, env.world_size,
                               seed=cfg["seed"], epoch=epoch, shuffle=True, flip=cfg["flip"],
                               balance_classes=cfg["balance_classes"], backend=cfg["backend"],
                               device=env.device.type, num_threads=cfg.get("num_threads"), skip_batches=skip)

        probe = loader(0)
        classes, image_size, epoch_batches = list(probe.classes), int(probe.image_size), probe.epoch_batches
        if epoch_batches < 1:
            raise ValueError(f"{shards}: split {cfg.get('split', 'train')!r} has no samples to train on")
        total = int(cfg["steps"]) if cfg.get("steps") else int(cfg["epochs"]) * epoch_batches
        run_config = {**cfg, "shards": shards, "run_dir": str(run_dir), "model": asdict(spec), "classes": classes,
                      "num_classes": len(classes), "image_size": image_size, "steps": total,
                      "world_size": env.world_size}
        state_fields = {"steps": total, "model": spec.name, "world_size": env.world_size}
        # what fixes the order of batches within an epoch; a resume with any of it changed restarts the epoch
        data_order = {"shards": shards, "split": cfg.get("split", "train"), "batch_size": batch,
                      "seed": int(cfg["seed"]), "world_size": env.world_size,
                      "balance_classes": bool(cfg["balance_classes"])}

        ckpt, ckpt_path = load_latest(run_dir, map_location=env.device)
        if ckpt is None and list_checkpoints(run_dir):
            raise RuntimeError(f"{run_dir / 'checkpoints'} has checkpoints but none loads (see the warnings); "
                               "refusing to start over and overwrite them: move them away or use a new run_dir")
        start = int(ckpt["step"]) if ckpt else 0
        lo = dist.all_reduce_max(env, torch.tensor([float(start), -float(start)], device=env.device)).tolist()
        if lo[0] != -lo[1]:
            raise RuntimeError(f"ranks found different newest checkpoints in {run_dir / 'checkpoints'} "
                               "(a shared filesystem lagging?); restart the job")
        if ckpt is not None:
            _check_compatible(ckpt["config"], run_config, run_dir)
        if start >= total:
            msg = f"{run_dir} already finished ({start}/{total} steps); nothing to do"
            if env.is_main:
                print(msg, flush=True)
                write_json(run_dir / "status.json", {**read_status(run_dir), "state": "finished", "step": start,
                                                     "steps": total})
            logger.info(msg)
            return EXIT_OK

        trainer = Trainer(spec, len(classes), image_size, env, seed=int(cfg["seed"]), precision=cfg["precision"],
                          ema=float(cfg["ema"]), diffaug=cfg.get("diffaug") or (),
                          channels_last=bool(cfg.get("channels_last", True)))
        epoch, in_epoch, train_seconds = 0, 0, 0.0
        if ckpt is not None:
            trainer.load_state_dict(ckpt)
            restore_rng(ckpt["rng"])
            epoch, in_epoch = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
            train_seconds = float(ckpt["meta"].get("train_seconds", 0.0))
            saved_order = ckpt["meta"].get("data_order") or {"world_size": ckpt["meta"].get("world_size", env.world_size)}
            changed = {k: (v, data_order.get(k)) for k, v in saved_order.items() if data_order.get(k) != v}
            if changed:  # the saved position counts batches of another order: it would land somewhere arbitrary
                logger.warning("resuming with a different data order (%s): epoch %d is restarted from its first "
                               "batch", "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), epoch)
                in_epoch = 0
            logger.info("resuming from %s (step %d, epoch %d, batch %d)", ckpt_path, start, epoch, in_epoch)
        del ckpt

        if env.is_main:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            from omegaconf import OmegaConf
            atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(run_config).encode())
            write_json(run_dir / "status.json", {"state": "running", "step": start, **state_fields})
        log = CsvLog(run_dir / "log.csv", start) if env.is_main else None
        diversity_log = CsvLog(run_dir / "samples" / "diversity.csv", start, DIVERSITY_COLUMNS) if env.is_main else None
        tb = _tensorboard(cfg.get("tensorboard", "auto"), run_dir) if env.is_main else None
        dist.barrier(env)

        def checkpoint(step: int) -> Path | None:
            if env.distributed and not trainer.ranks_in_sync():
                logger.warning("step %d: G/D parameters differ between ranks (gradient sync broken?); "
                               "the checkpoint holds rank 0's", step)
            path = None
            if env.is_main:
                state = {"step": step, "epoch": epoch, "batch_in_epoch": in_epoch, "config": run_config,
                         **trainer.state_dict(), "rng": capture_rng(),
                         "meta": {"world_size": env.world_size, "data_order": data_order,
                                  "train_seconds": train_seconds + time.time() - t0,
                                  "torch": str(torch.__version__), "time": time.time()}}
                path = save_checkpoint(run_dir, state, keep_last=int(cfg["keep_last"]))
            dist.barrier(env)  # nobody leaves before the checkpoint is on disk
            return path

        def samples(step: int) -> None:
            if env.is_main:
                k = int(cfg["samples_per_class"])
                labels = (list(classes) if spec.conditional else
                          [f"code {i}" for i in range(trainer.num_classes)] if spec.info_cat else None)
                grid = trainer.sample_grid(k)
                save_grid(grid, k, run_dir / "samples" / f"step-{step:08d}.png", labels)
                div = grid_diversity(grid, k)
                diversity_log.write({"step": step, **{c: _fmt(v) for c, v in div.items()}})
                if tb is not None:
                    for c, v in div.items():
                        tb.add_scalar(f"samples/{c}", v, step)
                try:  # a picture is not worth a failed run
                    from hpcgan.viz import training_curves
                    training_curves(run_dir, run_dir / "curves.png", f"{spec.name}: {run_dir.name}")
                except Exception as e:  # noqa: BLE001
                    logger.warning("curves.png not drawn: %s: %s", type(e).__name__, e)

        pbar = None
        if env.is_main and cfg.get("progress", True):
            from tqdm import tqdm
            pbar = tqdm(total=total, initial=start, desc=f"train {spec.name}", unit="step", dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30)  # Slurm logs: no flood of \r updates

        t0 = time.time()
        t_log, n_log = time.time(), 0
        bad_streak, last_ckpt, stats = 0, start if start > 0 else -1, {}
        batches = iter(loader(epoch, min(in_epoch, epoch_batches)))
        step = start
        while step < total:
            try:
                real, y = next(batches)
            except StopIteration:  # same len on every rank: all ranks turn the epoch together
                epoch, in_epoch = epoch + 1, 0
                batches = iter(loader(epoch))
                continue
            step_stats, bad, stop = trainer.step(real, y, step, stop_flag.requested)
            in_epoch += 1
            step += 1
            n_log += real.shape[0]
            stats.update(step_stats)
            bad_streak = bad_streak + 1 if bad else 0
            if bad:
                logger.warning("step %d: non-finite loss or gradient on some rank; update skipped (%d in a row)",
                               step, bad_streak)
            diverged = bad_streak >= int(cfg["max_bad_steps"])
            if pbar is not None:
                pbar.update(1)

            if step % int(cfg["log_every"]) == 0 or step == total or diverged:
                keys = sorted(stats)
                vals = dist.all_reduce_mean(env, torch.stack([stats[k].float() for k in keys])).tolist()
                row = {k: _fmt(v) for k, v in zip(keys, vals)}
                dt = time.time() - t_log
                row.update(step=step, epoch=epoch, time=_fmt(train_seconds + time.time() - t0),
                           images_per_s=_fmt(n_log * env.world_size / max(dt, 1e-9)),
                           lr=_fmt(trainer.opt_D.param_groups[0]["lr"]), bad_steps=bad_streak)
                t_log, n_log = time.time(), 0
                if env.is_main:
                    log.write(row)
                    if tb is not None:
                        for k, v in zip(keys, vals):
                            tb.add_scalar(f"train/{k}", v, step)
                    if pbar is not None:
                        pbar.set_postfix(d=row.get("d_loss"), g=row.get("g_loss"), refresh=False)
                    write_json(run_dir / "status.json", {"state": "running", "step": step, **state_fields})
            if diverged:
                raise _Diverged(f"{bad_streak} consecutive non-finite steps (max_bad_steps={cfg['max_bad_steps']}) "
                                f"at step {step}: the run diverged. "
                                + (f"Checkpoints up to step {last_ckpt} are intact; " if last_ckpt > 0 else "")
                                + "lower model.optim.lr or use precision=fp32")
            if cfg["sample_every"] and step % int(cfg["sample_every"]) == 0:
                samples(step)
            if stop:
                checkpoint(step)
                samples(step)
                name = stop_flag.name or "a stop signal (on another rank)"
                if env.is_main:
                    write_json(run_dir / "status.json", {"state": "interrupted", "step": step, "signal": name,
                                                         **state_fields})
                    print(f"stopped by {name} at step {step}/{total}; checkpoint written; rerun to resume",
                          file=sys.stderr, flush=True)
                dist.barrier(env)  # leave together (see the end of the run)
                return EXIT_SIGNAL
            if step % int(cfg["ckpt_every"]) == 0 and bad_streak == 0 and step < total:
                checkpoint(step)
                last_ckpt = step

        if pbar is not None:
            pbar.close()
        checkpoint(step)
        if not (cfg["sample_every"] and step % int(cfg["sample_every"]) == 0):
            samples(step)
        if env.is_main:
            from hpcgan.viz import read_columns
            signal = class_signal([v for _, v in read_columns(run_dir / "log.csv").get("ac_acc_real", [])],
                                  np.bincount(probe.index.labels, minlength=len(classes)).tolist(),
                                  bool(cfg["balance_classes"]))
            if signal is not None and not signal["learnt"]:
                logger.warning("auxiliary classifier on real images: accuracy %.2f over the last %d log rows "
                               "(chance %.2f): %s", signal["accuracy"], signal["rows"], signal["chance"],
                               CLASS_SIGNAL_ADVICE)
            write_json(run_dir / "status.json", {"state": "finished", "step": step, **state_fields,
                                                 **({"class_signal": signal} if signal is not None else {})})
        logger.info("finished %d steps in %s", step, run_dir)
        dist.barrier(env)  # leave together: a rank tearing gloo down while rank 0 still writes aborted (rc -6)
        return EXIT_OK
    except _Diverged as e:
        logger.error("%s", e)
        _mark_failed(env, run_dir, e, state_fields)
        return EXIT_FAILED
    except Exception as e:
        _mark_failed(env, run_dir, e, state_fields)
        raise
    finally:
        stop_flag.restore()
        # Tear down in a fixed order: DDP wrappers (which hold the process group) and loader iterators go
        # before the process group, not whenever the garbage collector or interpreter exit gets to them
        # (a gloo group freed during interpreter shutdown aborted a rank now and then: rc -6, "terminate
        # called without an active exception").
        trainer = probe = batches = None  # noqa: F841
        gc.collect()
        dist.cleanup(env)


class _Diverged(RuntimeError):
    pass


def _mark_failed(env, run_dir: Path, err: Exception, fields: dict) -> None:
    if env.is_main and run_dir.is_dir():
        st = read_status(run_dir)
        write_json(run_dir / "status.json", {**st, **fields, "state": "failed",
                                             "error": f"{type(err).__name__}: {err}"})


_MUST_MATCH = ("name", "generator", "critic", "conditional", "critic_condition", "z_dim", "width", "info_cat",
               "info_cont", "critic_norm", "ac_twin")


def _check_compatible(saved: dict, now: dict, run_dir: Path) -> None:
    defaults = {f.name: f.default for f in fields(GANSpec)}  # a key newer than the checkpoint: its default
    old, new = ({k: m.get(k, defaults.get(k)) for k in _MUST_MATCH} for m in (saved["model"], now["model"]))
    diffs = [f"model.{k}: {old[k]!r} -> {new[k]!r}" for k in _MUST_MATCH if old[k] != new[k]]
    diffs += [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in ("classes", "image_size") if saved.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"{run_dir} holds checkpoints of a different model/data ({'; '.join(diffs)}); "
                         "use a new run_dir or the original settings")


def _setup_logging() -> None:
    rank = dist.launch_env()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def _hydra_main():
    import hydra
    from omegaconf import OmegaConf

    from hpcgan import CONFIG_DIR

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
    def main(cfg) -> None:
        _setup_logging()
        code = run(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
        if code != EXIT_OK:
            sys.exit(code)

    main()


if __name__ == "__main__":
    _hydra_main()
