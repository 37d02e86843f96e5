"""Train one classifier (architecture x data regime x seed) and score it on the real test split.

    python tools/classify.py shards=REAL [synthetic=SYN] arch=small_cnn regime=original out=RUN_DIR
    torchrun --standalone --nproc_per_node=N -m hpcgan.classify shards=... arch=resnet50 regime=aug2 out=...

Settings: ClassifySettings (configs/classify.yaml documents the same defaults). The run reads top to bottom
in ClassifierRun.run(): setup (regime, leakage guard, training set, val split), resume, loop, finish.

Training: up to `steps` optimisation steps for every regime (one batch per rank each; AdamW; the learning rate
and the stopping rule are hpcgan.classify.schedule's: cosine to `steps`, or `schedule=plateau`, train until val
stops improving). All randomness of step s on rank r (augmentation, dropout) comes
from the global torch RNG seeded by (seed, r, s), and the data order is the loader's plan of (seed, epoch,
rank), so a run killed and resumed from a checkpoint ends with the same weights as an uninterrupted one.
Model selection: the val split is scored every `eval_every` steps and at the end; the weights with the best
val `select_on` (default macro-F1: with scarce classes, accuracy rewards ignoring them; the first step on a
tie) are kept, in the checkpoint, and are the ones scored. The test split is decoded only after training, and
never with score_split=val (a rival search's runs: hpcgan.classify.rival; recipe_from= takes their winner).

Run directory (hpcgan.rundir): config.yaml, status.json, log.csv, checkpoints/ (hpcgan.checkpoint, with the
best weights inside), training_set.json (images per class and source, the synthetic set's provenance),
scarce.json (with scarce=: the content hashes of the real images the cut kept),
results.json + results.jsonl (hpcgan.results rows), confusion_matrix.csv/.png.

Exit codes: 0 finished (or already), 1 failed, 2 bad input (settings, data, leakage guard: nothing trained),
3 stopped by SIGTERM/SIGUSR2/SIGINT after a checkpoint (rerun to resume).
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hpcgan import dist
from hpcgan.checkpoint import capture_rng, checkpoint_path, restore_rng, resume_point, save_checkpoint
from hpcgan.classify.archs import build_classifier, get_arch, load_pretrained
from hpcgan.classify.augment import RECIPES, augment_batch, build_recipe
from hpcgan.classify.data import DataError, decode_split, epoch_loader, manifest_sha256, training_set, val_cut
from hpcgan.classify.metrics import confusion_csv, confusion_png, scores
from hpcgan.classify.provenance import LeakageError, check_synthetic
from hpcgan.classify.refit import plan as refit_plan
from hpcgan.classify.regimes import AXES, NEWER_AXES, RegimeLoss, check_final, get_regime, parse_spec
from hpcgan.classify.rival import pick
from hpcgan.classify.schedule import SCHEDULES, Schedule
from hpcgan.classify.splitbn import split_batchnorm, synthetic_rows
from hpcgan.data.loader import BACKENDS
from hpcgan.fsutil import atomic_write_bytes
from hpcgan.progress import Progress
from hpcgan.results import append_rows, number, write_result
from hpcgan.rundir import (EXIT_BAD_INPUT, EXIT_OK, LOG, CsvLog, read_json, read_status, write_config, write_json,
                           write_status)
from hpcgan.settings import MISSING, SettingsError, check_choice, check_range, field_defaults, parse

logger = logging.getLogger("hpcgan.classify")

FORMAT = 1
PRECISIONS = ("auto", "fp32", "bf16")
SELECT_ON = ("macro_f1", "accuracy")
SCORE_SPLITS = ("test", "val")
CKPT_KEYS = ("step", "epoch", "batch_in_epoch", "config", "model", "opt", "best", "rng", "meta")
LOG_COLUMNS = ("step", "epoch", "time", "loss", "train_accuracy", "lr", "images_per_s", "bad_steps",
               "val_accuracy", "val_macro_f1", "best_step")
RESULT, RESULTS, TRAINING_SET, SCARCE = "results.json", "results.jsonl", "training_set.json", "scarce.json"
# a checkpoint from other values of these cannot be continued (another model, data or schedule; patience shapes
# the plateau schedule's rate, and under cosine another patience would be another stopping rule)
MUST_MATCH = ("arch", "regime", "recipe", "score_split", "tta", "seed", "steps", "batch_size", "lr", "weight_decay", "warmup", "schedule",
              "patience", "plateau_factor", "plateau_decays", "synthetic_per_class", "cut_val",
              "logit_adjust_tau", "recipes", "regime_axes", "scarce", "scarce_seed", "classes", "image_size", "manifest_sha256",
              "synthetic_manifest_sha256", "pretrained_sha256")
REFIT_KEYS = ("refit",)   # a refit's plan must match too on resume (not against its source, which has none)


@dataclass
class ClassifySettings:
    """What a classifier run takes; these defaults are the ones (configs/classify.yaml documents them)."""
    shards: str = MISSING                   # the real shard set: train (training), val (selection), test (score)
    out: str = MISSING                      # the run directory (re-running it resumes)
    synthetic: str | None = None            # a synthetic shard set (tools/generate.py), for the synthetic regimes
    synthetic_name: str | None = None       # how the rows name that set (synthetic_from; null: its GAN's model,
                                            # e.g. a study's lever variant of one model names its own)
    arch: str = "small_cnn"                 # small_cnn | small_resnet | inception_v3 | resnet50 | vgg16 | vgg19 | xception | timm:NAME
    regime: str = "original"                # see hpcgan.classify.regimes
    seed: int = 0
    steps: int = 2000                       # optimisation steps, the same for every regime
    batch_size: int = 64                    # per rank
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05                    # a linear learning-rate warm-up: steps (over 1), or a share of `steps`
    eval_every: int = 250                   # val scoring (and model selection) every N steps and at the end
    patience: int | None = None             # early stopping: stop after this many val scorings without a new
                                            # best (select_on); `steps` is then the cap. null: train all steps
    schedule: str = "cosine"                # cosine (to `steps`) | plateau (full rate until `patience` scorings
                                            # without a new best, then x plateau_factor, plateau_decays times,
                                            # then stop; hpcgan.classify.schedule)
    plateau_factor: float = 0.1
    plateau_decays: int = 2
    select_on: str = "macro_f1"             # macro_f1 | accuracy (on val)
    tta: bool = False                       # score val (selection) and test with the softmax averaged over the 8
                                            # flips and rotations of each cell (test-time augmentation)
    logit_adjust_tau: float = 1.0           # regime logit_adjust: tau of Menon et al. (2021)
    synthetic_per_class: int | None = None  # regime synthetic: images per class (null: the set's smallest class)
    scarce: dict[str, int] | None = None    # scarcity study: {class: N} cuts the real train split (hpcgan.data.scarce)
    scarce_seed: int | None = None          # which cut (null: seed); a GAN for it must use the same
    cut_val: bool = False                   # with scarce: cut the val split's scarce classes too, to the share of
                                            # their val images that the cut keeps of their train ones (at least 1)
    # the regime's axes over its preset (hpcgan.classify.regimes; null: the preset's)
    sampling: str | None = None             # shuffled | balanced
    loss: str | None = None                 # ce | weighted | logit_adjust
    augment: str | None = None              # none | a recipe name below
    synthetic_count: Any = None             # real+synthetic: topup | N | Nx
    real_share: float | None = None         # balanced real+synthetic: share of a class's draws from real images
    prior: str | None = None                # real+synthetic with a weighted / logit_adjust loss: all | real counts
    synthetic_bn: str | None = None         # real+synthetic: shared | split (the synthetic cells' own batch norm)
    recipe_from: list[str] | None = None    # a rival search's run dirs (score_split=val): the best on val gives
                                            # the sampling, loss and augment this run sets neither way above
                                            # (hpcgan.classify.rival)
    score_split: str = "test"               # test | val: the split the kept weights are scored on (val: a
                                            # rival search's runs, which never read test)
    tag: str | None = None                  # the study row this run is (search, rival, full, on_rival): in its rows
    recipes: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: copy.deepcopy(RECIPES))
    refit_from: str | None = None           # a finished run of these settings: train on train + val for its best
                                            # step with its learning rate, score the last weights on test
                                            # (hpcgan.classify.refit)
    pretrained_file: str | None = None      # ImageNet weights staged as a file (never downloaded); null: from scratch
    pretrained: bool = False                # ImageNet weights staged by name (tools/stage_weights.py timm:ARCH)
    weights_dir: str | None = None          # where they are staged (null: $HPCGAN_WEIGHTS, else ~/.cache/hpcgan/weights)
    allow_unknown_provenance: bool = False  # accept a synthetic set whose GAN's training data cannot be checked
    precision: str = "auto"                 # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16
    device: str = "auto"
    channels_last: bool = True
    backend: str = "auto"                   # data loader: auto | dali | webdataset
    num_threads: int | None = None
    eval_batch_size: int = 256
    log_every: int = 50
    ckpt_every: int = 500
    keep_last: int = 2
    max_bad_steps: int = 20
    results: str | None = None              # JSON-lines file the rows are appended to (default OUT/results.jsonl)
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            get_arch(self.arch)
            regime = self.composed_regime()
            if not self.recipe_from:   # else the rival's recipe may still fill the loss (ClassifierRun.setup)
                check_final(regime)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if self.pretrained and not self.pretrained_file and not get_arch(self.arch).pretrained:
            from hpcgan.classify.pretrained import stageable
            raise SettingsError(f"pretrained=true: arch={self.arch} has no ImageNet weights staged by name (those "
                                f"that do: {', '.join(stageable())}); pass pretrained_file=PATH instead")
        if regime.reads_synthetic and not self.synthetic:
            raise SettingsError(f"regime={self.regime} trains on synthetic images: pass synthetic=DIR")
        if not regime.reads_synthetic and self.synthetic:
            raise SettingsError(f"regime={self.regime} does not read a synthetic set: drop synthetic=")
        if self.synthetic_name is not None and not self.synthetic:
            raise SettingsError("synthetic_name= names a synthetic set: pass synthetic=DIR too, or drop it")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("select_on", self.select_on, SELECT_ON)
        check_choice("score_split", self.score_split, SCORE_SPLITS)
        if self.recipe_from is not None and not self.recipe_from:
            raise SettingsError("recipe_from: give the rival search's run directories, or leave it out")
        check_choice("backend", self.backend, BACKENDS)
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every", "ckpt_every",
                     "max_bad_steps"):
            check_range(name, getattr(self, name), 1)
        check_range("keep_last", self.keep_last, 0)
        check_range("seed", self.seed, 0)
        check_range("lr", self.lr, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("warmup", self.warmup, 0)
        if self.warmup > 1 and (self.warmup != int(self.warmup) or self.warmup >= self.steps):
            raise SettingsError(f"warmup={self.warmup:g}: give a share of the steps (at most 1) or a whole number of "
                                f"steps under steps={self.steps}")
        check_range("logit_adjust_tau", self.logit_adjust_tau, 0)
        if self.synthetic_per_class is not None:
            check_range("synthetic_per_class", self.synthetic_per_class, 1)
        if self.patience is not None:
            check_range("patience", self.patience, 1)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.schedule == "plateau" and self.patience is None:
            raise SettingsError("schedule=plateau decays the learning rate when val stops improving: set patience=N "
                                "(val scorings without a new best), e.g. patience=4")
        check_range("plateau_factor", self.plateau_factor, 1e-6, 1)
        check_range("plateau_decays", self.plateau_decays, 0)
        if self.num_threads is not None:
            check_range("num_threads", self.num_threads, 1)
        if self.refit_from and (self.scarce or self.score_split == "val"):
            raise SettingsError("refit_from= trains on the val split too: it cannot keep a scarce cut (val's cells of "
                                "a cut class would undo it) nor score on val; drop refit_from= or scarce= / "
                                "score_split=val")
        for name, n in (self.scarce or {}).items():
            check_range(f"scarce.{name}", n, 1)
        if self.scarce_seed is not None:
            check_range("scarce_seed", self.scarce_seed, 0)
        for name, steps in self.recipes.items():
            try:
                build_recipe(steps, 32)
            except ValueError as e:
                raise SettingsError(f"recipes.{name}: {e}") from None

    def composed_regime(self, recipe: dict | None = None):
        """The regime preset (or spec) with this run's axes over it (hpcgan.classify.regimes.compose); `recipe`
        (a rival search's winning axes) fills the axes that neither the spec nor a setting gives."""
        from hpcgan.classify.regimes import compose
        preset, spec_axes = parse_spec(self.regime)
        get_regime(preset)
        given = {k: getattr(self, k) for k in AXES}
        axes = {**(recipe or {}), **spec_axes, **{k: v for k, v in given.items() if v is not None}}
        return compose(preset, **axes, recipes=tuple(self.recipes))


SETTING_DEFAULTS = field_defaults(ClassifySettings)   # what a setting a checkpoint predates is compared as


# ---- small pieces ----------------------------------------------------------------------------------

def step_seed(seed: int, rank: int, step: int) -> int:
    from hpcgan.train import step_generator
    return step_generator(seed, rank, step, torch.device("cpu")).initial_seed()


def planned(loader):
    """(images, labels, training-set positions) of each batch of `loader`: the positions from its plan, which
    both backends follow sample for sample."""
    for (idx, _), (x, y) in zip(loader.planned_batches(), loader, strict=True):
        if len(idx) != len(y):
            raise RuntimeError(f"the loader gave a batch of {len(y)} for a planned batch of {len(idx)}")
        yield x, y, idx


def setting_differences(saved: dict, current: dict, keys=MUST_MATCH) -> list[str]:
    """Where `current` (a run's config) differs from `saved` (a checkpoint's, or a refit's source's) among `keys`;
    a key `saved` predates counts as its default, and so does a regime axis it predates."""
    old = {k: saved.get(k, SETTING_DEFAULTS.get(k)) for k in keys}
    if isinstance(old.get("regime_axes"), dict):
        old["regime_axes"] = {**NEWER_AXES, **old["regime_axes"]}
    return [f"{k}: {old[k]!r} -> {current.get(k)!r}" for k in keys if old[k] != current.get(k)]


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}"


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    from hpcgan.train import resolve_precision as gan_rule
    return gan_rule(name, device)[0]


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square of a batch [B, C, H, W]: 4 rotations by 90 degrees, each also mirrored
    (a cell on a slide has no orientation)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        views += [r, r.flip(-1)]
    return views


def predict(net: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Predicted labels of a batch in [-1, 1]: the argmax of the logits, or with `tta` of the softmax averaged
    over the 8 dihedral views (test-time augmentation)."""
    if not tta:
        return net(x).argmax(1)
    return torch.stack([net(v).float().softmax(1) for v in dihedral_views(x)]).mean(0).argmax(1)


@torch.no_grad()
def confusion_on(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 env: dist.DistEnv, batch_size: int, autocast_dtype=None, tta: bool = False) -> np.ndarray:
    """Confusion matrix of `model` on uint8 images (`tta`: see predict); batches shared round robin by the ranks
    and summed."""
    net = model.module if isinstance(model, DDP) else model
    was = net.training
    net.eval()
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=env.device)
    for b, start in enumerate(range(0, len(images), batch_size)):
        if b % env.world_size != env.rank:
            continue
        x = images[start:start + batch_size].to(env.device).float().sub_(127.5).div_(127.5)
        y = labels[start:start + batch_size].to(env.device)
        with torch.autocast(env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = predict(net, x, tta)
        cm += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
    if env.distributed:
        torch.distributed.all_reduce(cm)
    net.train(was)
    return cm.reshape(num_classes, num_classes).cpu().numpy()


# ---- the run ---------------------------------------------------------------------------------------

class ClassifierRun:
    """One run in its run directory: rank 0 writes the files, every rank trains and scores its share."""

    def __init__(self, settings: ClassifySettings, env: dist.DistEnv):
        self.s, self.env = settings, env
        self.stop_flag = dist.StopFlag()
        self.run_dir = Path(settings.out).resolve()
        self.model = self.pbar = self.log = self.batches = None
        self.best: dict = {"step": -1, "score": -1.0, "val": None, "model": None}

    def run(self) -> int:
        self.setup()
        ckpt = self.newest_checkpoint()
        best_step = ckpt["best"]["step"] if ckpt else -1
        self.schedule.load_state_dict(ckpt.get("schedule") if ckpt else None)
        if ((self.step >= self.total or self.schedule.stopped(self.step, best_step))
                and read_json(self.run_dir / RESULT) is not None):
            return self.already_finished()
        self.build(ckpt)
        del ckpt
        self.open_outputs()
        if self.step < self.total and self.loop():
            return self.interrupted()
        self.finish()
        return EXIT_OK

    # ---- setup: what this run is, before any work
    def setup(self) -> None:
        s, env = self.s, self.env
        self.recipe = pick(s.recipe_from, s.select_on) if s.recipe_from else None
        self.regime, self.arch = s.composed_regime(self.recipe and self.recipe["axes"]), get_arch(s.arch)
        try:
            check_final(self.regime)
        except ValueError as e:
            raise DataError(f"{e}; the rival's recipe ({(self.recipe or {}).get('winner')}) gave loss="
                            f"{self.regime.loss}: set loss= in the regime") from None
        self.autocast = resolve_precision(s.precision, env.device)
        self.scarce_seed = s.seed if s.scarce_seed is None else s.scarce_seed
        self.refit = refit_plan(s.refit_from) if s.refit_from else None
        self.val_cut = val_cut(s.shards, s.scarce) if s.cut_val else None
        self.provenance = (check_synthetic(s.shards, s.synthetic, s.allow_unknown_provenance, s.scarce,
                                           self.scarce_seed) if self.regime.reads_synthetic else None)
        self.data = training_set(self.regime, s.shards, s.synthetic, s.synthetic_per_class, s.scarce,
                                 self.scarce_seed, with_val=self.refit is not None)
        self.classes, self.image_size = self.data.classes, self.data.image_size
        try:
            self.epoch_batches = self.loader(0).epoch_batches
        except ValueError as e:  # e.g. a batch larger than the training set
            raise DataError(f"regime {s.regime}: {e}") from None
        self.total = self.refit.best_step if self.refit else s.steps
        self.schedule = Schedule(s.schedule, s.lr, s.steps, s.warmup, s.eval_every, s.patience, s.plateau_factor,
                                 s.plateau_decays, replay=self.refit.decayed_at if self.refit else None)
        self.aug = (build_recipe(s.recipes[self.regime.augment], self.image_size) if self.regime.augment else None)
        self.loss_fn = RegimeLoss(self.regime, self.data.class_counts, s.logit_adjust_tau, env.device,
                                  real_counts=[self.data.counts["real"].get(c, 0) for c in self.data.classes])
        sha = manifest_sha256(s.shards)
        syn_sha = manifest_sha256(s.synthetic) if s.synthetic else None
        self.pretrained = self.pretrained_path()
        pre_sha = None
        if self.pretrained:
            from hpcgan.data.shards import sha256_file
            pre_sha = sha256_file(self.pretrained)
        self.run_config = {**asdict(s), "shards": str(Path(s.shards).resolve()), "out": str(self.run_dir),
                           "synthetic": str(Path(s.synthetic).resolve()) if s.synthetic else None,
                           "classes": self.classes, "image_size": self.image_size, "world_size": env.world_size,
                           "manifest_sha256": sha, "synthetic_manifest_sha256": syn_sha, "pretrained_sha256": pre_sha,
                           "timm": self.arch.timm, "training_set": self.data.describe(),
                           "regime_name": self.regime.name, "regime_axes": self.regime.axes(),
                           "recipe": self.recipe, "refit": self.refit.as_dict() if self.refit else None,
                           "scarce_seed": self.scarce_seed if s.scarce else None, "val_cut": self.val_cut}
        if self.refit:   # the same settings, and as many ranks (another global batch is another step count)
            diffs = setting_differences(self.refit.config, self.run_config, MUST_MATCH + ("world_size",))
            if diffs:
                raise DataError(f"refit_from={self.refit.source} ran other settings or data ({'; '.join(diffs)}): "
                                "give its settings")
        self.data_order = {"world_size": env.world_size}
        self.status_fields = {"steps": self.total, "arch": s.arch, "regime": self.regime.name, "seed": s.seed,
                              "world_size": env.world_size}

    def pretrained_path(self) -> Path | None:
        """The ImageNet weights file: pretrained_file= as given, else the one staged for the arch (pretrained=true)."""
        s = self.s
        if s.pretrained_file:
            path = Path(s.pretrained_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"pretrained_file={path} does not exist: stage the ImageNet weights file "
                                        "there first (compute nodes cannot download)")
            return path
        if s.pretrained:
            from hpcgan.classify.pretrained import find_staged
            try:
                return find_staged(s.arch, s.weights_dir)
            except ValueError as e:
                raise DataError(str(e)) from None
        return None

    def loader(self, epoch: int, skip: int = 0):
        s, env = self.s, self.env
        return epoch_loader(self.data, s.batch_size, env.rank, env.world_size, seed=s.seed, epoch=epoch,
                            skip_batches=skip, backend=s.backend, device=env.device.type, num_threads=s.num_threads)

    def newest_checkpoint(self) -> dict | None:
        ckpt, path = resume_point(self.run_dir, self.env, required=CKPT_KEYS,
                                  none_loads="is a classifier checkpoint that loads (see the warnings); move "
                                             "them away or use a new out=")
        self.step = int(ckpt["step"]) if ckpt else 0
        if ckpt is not None:
            diffs = setting_differences(ckpt["config"], self.run_config, MUST_MATCH + REFIT_KEYS)
            if diffs:
                raise DataError(f"{self.run_dir} holds a classifier of other settings or data ({'; '.join(diffs)}); "
                                "use a new out= or the original settings")
            logger.info("resuming from %s (step %d)", path, self.step)
        return ckpt

    def already_finished(self) -> int:
        if self.env.is_main:
            print(f"{self.run_dir} already finished ({self.step}/{self.total} steps, results in "
                  f"{self.run_dir / RESULT}); nothing to do", flush=True)
            write_status(self.run_dir, {**read_status(self.run_dir), "state": "finished"})
        return EXIT_OK

    def build(self, ckpt: dict | None) -> None:
        s, env = self.s, self.env
        torch.manual_seed(s.seed)  # the same initial weights on every rank
        model, self.arch_info = build_classifier(s.arch, len(self.classes), self.image_size)
        if self.pretrained:
            self.arch_info["pretrained"] = load_pretrained(model, self.pretrained)
        if self.regime.synthetic_bn == "split":
            try:
                self.arch_info["split_batchnorm_layers"] = split_batchnorm(model)
            except ValueError as e:
                raise DataError(str(e)) from None
        self.memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
        model = model.to(env.device, memory_format=self.memory_format)
        self.opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.epoch, self.in_epoch, self.train_seconds = 0, 0, 0.0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["opt"])
            self.best = ckpt["best"]
            restore_rng(ckpt["rng"])
            self.epoch, self.in_epoch = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
            self.train_seconds = float(ckpt["meta"].get("train_seconds", 0.0))
            if ckpt["meta"].get("data_order") != self.data_order:
                logger.warning("resuming with another number of ranks (%s -> %s): epoch %d restarts from its first "
                               "batch", ckpt["meta"].get("data_order"), self.data_order, self.epoch)
                self.in_epoch = 0
        if env.distributed:
            # split batch norm: a batch without synthetic cells leaves the auxiliary layers without a gradient
            model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                        find_unused_parameters=self.regime.synthetic_bn == "split")
        self.model = model
        if self.refit is None:   # a refit trains on val: it never scores it
            self.val_x, self.val_y = decode_split(s.shards, "val", env.device, s.backend, s.num_threads,
                                                  self.val_cut, self.scarce_seed)

    def open_outputs(self) -> None:
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.run_dir, self.run_config)
            write_json(self.run_dir / TRAINING_SET, {**self.data.describe(), "regime": asdict(self.regime),
                                                     "provenance": self.provenance})
            if self.data.scarce:  # the cut's content hashes: which real images this run was allowed
                write_json(self.run_dir / SCARCE, self.data.scarce)
            self.write_status("running")
            self.log = CsvLog(self.run_dir / LOG, LOG_COLUMNS, self.step)
            if self.step < self.total:
                self.pbar = Progress(self.total, f"classify {self.s.arch} {self.regime.name}", "step",
                                     bar=self.s.progress, initial=self.step)
        dist.barrier(self.env)

    # ---- the loop
    def loop(self) -> bool:
        """Train to `total` steps; True when a stop signal ended it early."""
        s = self.s
        self.t0 = self.t_log = time.time()
        self.n_log, self.bad_streak, self.stats = 0, 0, torch.zeros(3, dtype=torch.float64)
        self.batches = planned(self.loader(self.epoch, min(self.in_epoch, self.epoch_batches)))
        while self.step < self.total:
            x, y, idx = self.next_batch()
            stop = self.train_step(x, y, idx)
            if self.bad_streak >= s.max_bad_steps:
                raise RuntimeError(f"{self.bad_streak} consecutive non-finite steps at step {self.step}: the run "
                                   "diverged; lower lr or use precision=fp32")
            evaluated = self.refit is None and (self.step % s.eval_every == 0 or self.step == self.total)
            if evaluated:
                self.validate()
            if self.step % s.log_every == 0 or evaluated or self.step == self.total:
                self.log_row(val=self.last_val if evaluated else None)
            if stop:
                return True
            if evaluated and self.after_val():
                return False
            if self.step % s.ckpt_every == 0 and self.step < self.total:
                self.checkpoint()
        return False

    def after_val(self) -> bool:
        """The schedule's word after a val scoring: a learning-rate decay (logged) or the early stop (whether)."""
        s, taken = self.s, self.schedule.taken
        if self.schedule.scored(self.step, self.best["step"]):
            logger.info("early stop at step %d: no better val %s than step %d's (%.4f) in %d scorings",
                        self.step, s.select_on, self.best["step"], self.best["score"], s.patience)
            return True
        if self.schedule.taken > taken:
            logger.info("step %d: no better val %s than step %d's (%.4f) in %d scorings: learning rate x %g (decay "
                        "%d of %d)", self.step, s.select_on, self.best["step"], self.best["score"], s.patience,
                        s.plateau_factor, self.schedule.taken, s.plateau_decays)
        return False

    def next_batch(self):
        while True:
            try:
                return next(self.batches)
            except StopIteration:
                self.epoch, self.in_epoch = self.epoch + 1, 0
                self.batches = planned(self.loader(self.epoch))

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> bool:
        """One optimisation step on the training set's samples `idx`; whether the ranks agreed to stop after it."""
        s, env = self.s, self.env
        torch.manual_seed(step_seed(s.seed, env.rank, self.step))  # augmentation and dropout of this step
        x, y = x.to(env.device), y.to(env.device)
        if self.aug is not None:
            x = augment_batch(x, self.aug)
        x = x.contiguous(memory_format=self.memory_format)
        for group in self.opt.param_groups:
            group["lr"] = self.schedule.lr_at(self.step)
        rows = torch.from_numpy(self.data.synthetic[idx] == 1) if self.regime.synthetic_bn == "split" else None
        with torch.autocast(env.device.type, dtype=self.autocast, enabled=self.autocast is not None), \
                synthetic_rows(self.model, rows, env.device):
            logits = self.model(x)
        loss = self.loss_fn(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        from hpcgan.train import grads_finite
        bad_here = ~(loss.detach().isfinite() & grads_finite(self.model))
        flags = torch.stack([bad_here.float().to(env.device),
                             torch.tensor(float(self.stop_flag.requested), device=env.device)])
        bad, stop = (bool(v) for v in dist.all_reduce_max(env, flags).tolist())
        if bad:
            self.opt.zero_grad(set_to_none=True)
            logger.warning("step %d: non-finite loss or gradient; update skipped", self.step)
        else:
            self.opt.step()
        self.bad_streak = self.bad_streak + 1 if bad else 0
        self.stats += torch.tensor([float(loss.detach()) * len(y), float((logits.argmax(1) == y).sum()), len(y)],
                                   dtype=torch.float64)
        self.in_epoch += 1
        self.step += 1
        self.n_log += len(y)
        if self.pbar is not None:
            self.pbar.update(1)
        return stop

    def validate(self) -> None:
        """Score val; keep the weights when they are the best so far (every rank, identically)."""
        s = self.s
        cm = confusion_on(self.model, self.val_x, self.val_y, len(self.classes), self.env, s.eval_batch_size,
                          self.autocast, s.tta)
        val = scores(cm, self.classes)["overall"]
        self.last_val = val
        if val[s.select_on] > self.best["score"]:
            net = self.model.module if isinstance(self.model, DDP) else self.model
            self.best = {"step": self.step, "score": float(val[s.select_on]), "val": val,
                         "model": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}

    def log_row(self, val: dict | None = None) -> None:
        """The ranks' training statistics since the last row (and the val scores of this step) -> log.csv."""
        env = self.env
        tot = dist.all_reduce_mean(env, self.stats.to(env.device)).cpu()
        dt = time.time() - self.t_log
        row = {"step": self.step, "epoch": self.epoch, "time": _fmt(self.elapsed()),
               "loss": _fmt(tot[0] / max(tot[2], 1)), "train_accuracy": _fmt(tot[1] / max(tot[2], 1)),
               "lr": _fmt(self.opt.param_groups[0]["lr"]), "bad_steps": self.bad_streak,
               "images_per_s": _fmt(self.n_log * env.world_size / max(dt, 1e-9)),
               "val_accuracy": _fmt(val["accuracy"]) if val else "",
               "val_macro_f1": _fmt(val["macro_f1"]) if val else "",
               "best_step": self.best["step"]}
        self.stats.zero_()
        self.t_log, self.n_log = time.time(), 0
        if env.is_main:
            self.log.write(row)
            if self.pbar is not None:
                self.pbar.set_postfix(loss=row["loss"], val=row["val_macro_f1"] or None)
            if val:  # curves.png: the loss and the train / val accuracies so far
                self.draw_curves()
            self.write_status("running")

    def draw_curves(self) -> None:
        from hpcgan.viz import CLASSIFIER_PANELS, training_curves
        training_curves(self.run_dir, self.run_dir / "curves.png",
                        f"{self.s.arch} / {self.regime.name}: {self.run_dir.name}", CLASSIFIER_PANELS)

    def elapsed(self) -> float:
        return self.train_seconds + time.time() - getattr(self, "t0", time.time())

    def checkpoint(self) -> None:
        if self.env.is_main:
            net = self.model.module if isinstance(self.model, DDP) else self.model
            state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.in_epoch,
                     "config": self.run_config, "model": net.state_dict(), "opt": self.opt.state_dict(),
                     "best": self.best, "schedule": self.schedule.state_dict(), "rng": capture_rng(),
                     "meta": {"data_order": self.data_order, "train_seconds": self.elapsed(),
                              "torch": str(torch.__version__), "time": time.time()}}
            save_checkpoint(self.run_dir, state, keep_last=self.s.keep_last, required=CKPT_KEYS)
        dist.barrier(self.env)

    def write_status(self, state: str, **extra) -> None:
        write_status(self.run_dir, {"state": state, "step": self.step, **self.status_fields,
                                    "best_step": self.best["step"], "best_val": self.best["score"], **extra})

    # ---- the ends of a run
    def interrupted(self) -> int:
        self.checkpoint()
        return self.stop_flag.leave(self.env, self.write_status, self.step, self.total)

    def finish(self) -> None:
        """The last checkpoint, then the best weights scored on the test split, the results written."""
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        if not checkpoint_path(self.run_dir, self.step).is_file():
            self.checkpoint()
        net = self.model.module if isinstance(self.model, DDP) else self.model
        if self.refit is None:   # a refit keeps its last weights: its length was chosen on val by its source
            if self.best["model"] is None:
                raise RuntimeError("no validation score was recorded; cannot select a model")
            net.load_state_dict(self.best["model"])
        elif self.env.is_main:
            self.draw_curves()
        if self.s.score_split == "val":   # a rival search's run: the test split is never read
            x, y = self.val_x, self.val_y
        else:
            x, y = decode_split(self.s.shards, "test", self.env.device, self.s.backend, self.s.num_threads)
        cm = confusion_on(net, x, y, len(self.classes), self.env, self.s.eval_batch_size, self.autocast, self.s.tta)
        if self.env.is_main:
            self.write_results(cm, len(y))
            self.write_status("finished")
        logger.info("finished %d steps in %s", self.step, self.run_dir)
        dist.barrier(self.env)

    @property
    def selected_on(self) -> str:
        return "refit" if self.refit else f"val_{self.s.select_on}"

    @property
    def synthetic_from(self) -> str | None:
        """The rows' name of the synthetic set: synthetic_name, else the model of the GAN that made it."""
        return self.s.synthetic_name or (self.provenance or {}).get("model")

    def write_results(self, cm: np.ndarray, n_test: int) -> dict:
        s, rd = self.s, self.run_dir
        sc = scores(cm, self.classes)
        decays = list(self.schedule.decay_steps(self.step))   # the decays that shaped the scored weights' steps
        cfg = self.run_config
        syn = None
        if s.synthetic:
            syn = {"path": cfg["synthetic"], "manifest_sha256": cfg["synthetic_manifest_sha256"],
                   "name": self.synthetic_from, "provenance": self.provenance}
        base = {"stage": "classify", "run_dir": str(rd), "arch": s.arch, "timm": self.arch.timm, "regime": self.regime.name,
                "preset": parse_spec(s.regime)[0], **self.regime.axes(),
                "seed": s.seed, "steps": self.total, "image_size": self.image_size,
                "input_size": self.arch_info["input_size"], "pretrained_sha256": cfg["pretrained_sha256"],
                "manifest_sha256": cfg["manifest_sha256"],
                "synthetic_manifest_sha256": cfg["synthetic_manifest_sha256"],
                "synthetic_from": self.synthetic_from,
                "provenance_unknown": bool((self.provenance or {}).get("unknown")),
                "scarce": s.scarce or None, "scarce_seed": cfg["scarce_seed"], "val_cut": self.val_cut,
                "real_split": s.score_split, "tag": s.tag, "recipe_from": (self.recipe or {}).get("winner"),
                "recipe_margin": (self.recipe or {}).get("margin"),
                "recipe_runner_up": (self.recipe or {}).get("runner_up"), "selected_on": self.selected_on,
                "tta": s.tta, "best_step": self.refit.best_step if self.refit else self.best["step"],
                "refit_from": self.refit.source if self.refit else None,
                "steps_run": self.step, "stopped_early": self.step < self.total, "patience": s.patience,
                "schedule": s.schedule, "lr_decays": len(decays) if s.schedule == "plateau" else None,
                "n_train": len(self.data.index), "n_test": n_test, "world_size": self.env.world_size}
        rows = [{**base, "metric": m, "class": None, "value": number(v)} for m, v in sc["overall"].items()]
        rows.append({**base, "metric": "steps_run", "class": None, "value": float(self.step)})  # the tables show it
        for m, per in sc["per_class"].items():
            for c, v in per.items():
                row = {**base, "metric": m, "class": c, "value": number(v)}
                if v is None:
                    row["skipped"] = "no test image of this class"
                rows.append(row)
        doc = {"format": FORMAT, "stage": "classify", "time": time.time(), "run_dir": str(rd), "classes": self.classes,
               "arch": self.arch_info, "regime": asdict(self.regime), "seed": s.seed, "steps": self.total,
               "image_size": self.image_size,
               "real": {"shards": cfg["shards"], "manifest_sha256": cfg["manifest_sha256"], "split": s.score_split,
                        "n": n_test}, "tag": s.tag, "recipe": self.recipe,
               "synthetic": syn, "training_set": self.data.describe(),
               "selection": ({"on": "refit", **self.refit.as_dict(), "val": None} if self.refit else
                             {"on": f"val_{s.select_on}", "best_step": self.best["step"], "val": self.best["val"]}),
               "lr_decay_steps": decays if self.schedule.known else None,
               "metrics": sc["overall"], "per_class": sc["per_class"], "confusion_matrix": cm.tolist(),
               "settings": asdict(s), "world_size": self.env.world_size, "rows": rows}
        atomic_write_bytes(rd / "confusion_matrix.csv", confusion_csv(cm, self.classes).encode())
        atomic_write_bytes(rd / "confusion_matrix.png", confusion_png(
            cm, self.classes, f"{s.arch} / {self.regime.name} / seed {s.seed}: test accuracy {sc['overall']['accuracy']:.3f}, "
                              f"macro-F1 {sc['overall']['macro_f1']:.3f}"))
        write_result(rd / RESULT, doc)
        append_rows(Path(s.results) if s.results else rd / RESULTS, rows)
        return doc

    def mark_failed(self, err: Exception) -> None:
        if self.env.is_main and self.run_dir.is_dir():
            write_status(self.run_dir, {**read_status(self.run_dir), "state": "failed",
                                        "error": f"{type(err).__name__}: {err}"})

    def close(self) -> None:
        self.stop_flag.restore()
        if self.pbar is not None:
            self.pbar.close()
        self.model = self.batches = None


def classify(settings: ClassifySettings | dict, env: dist.DistEnv | None = None) -> int:
    """Train and score one classifier per `settings`; returns the exit code (module docstring). Bad input
    (DataError, LeakageError, FileNotFoundError) is raised before anything is trained."""
    s = settings if isinstance(settings, ClassifySettings) else parse(ClassifySettings, settings)
    own_env = env is None
    env = env or dist.init(s.device)
    job = ClassifierRun(s, env)
    try:
        return job.run()
    except (DataError, LeakageError, FileNotFoundError):
        raise
    except Exception as e:
        job.mark_failed(e)
        raise
    finally:
        job.close()
        if own_env:
            dist.cleanup(env)


def main(argv: list[str] | None = None) -> int:
    """`python -m hpcgan.classify key=value ...` (also under torchrun): Hydra config configs/classify.yaml."""
    from hpcgan.settings import compose_settings
    rank = dist.launch_env()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        s = compose_settings(ClassifySettings, "classify", argv)
    except SettingsError as e:
        print(f"classify: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        code = classify(s)
    except (DataError, LeakageError, FileNotFoundError) as e:
        print(f"classify: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if code == EXIT_OK and rank == 0:
        doc = read_json(Path(s.out) / RESULT) or {}
        m = doc.get("metrics") or {}
        if m:
            print(f"{s.arch} / {doc.get('regime', {}).get('name', s.regime)} / seed {s.seed}: {s.score_split} accuracy {m['accuracy']:.4f}, macro-F1 "
                  f"{m['macro_f1']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f} -> {Path(s.out) / RESULT}")
    return code
