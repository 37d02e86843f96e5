"""The model registry: a model is a GANSpec (configs/model/<name>.yaml) + a generator and a critic
architecture looked up by name. The training objective (hpcgan/objectives.py) reads the same spec,
so no model is a branch in the training loop.

Contract (every architecture honours it):
  G(z, y) -> images in [-1, 1], shape [B, 3, S, S]
      z: [B, spec.latent_dim] float (noise, then InfoGAN codes appended: categorical one-hot, continuous; then,
         with spec.noisy_twins > 0, the class-embedding noise: hpcgan/latent.py); with spec.ae_init > 0 the
         generator is a PriorGenerator, which maps z through BAGAN's class-conditional prior first
      y: [B] int64 class labels, or None when the generator is unconditional
  D.features(x) -> [B, F] the features its heads read (BAGAN's encoder trunk)
  D(x, y) -> dict of tensors
      "adv":    [B]     critic score (wasserstein, hinge) or logit (bce)
      "cls":    [B, C]  class logits         (only when spec.ac_weight > 0)
      "cls_twin": [B, C] twin classifier of generated images (only when spec.ac_twin, TAC-GAN)
      "q_cat":  [B, K]  categorical-code logits (only when spec.info_cat > 0)
      "q_cont": [B, M]  continuous-code means   (only when spec.info_cont > 0)
      y is used only when spec.critic_condition == "projection" (CGAN, SNGAN-projection); otherwise ignored.
spec.spectral_norm wraps every conv / linear / embedding weight of the critic in spectral normalisation
(build_model, whatever the critic architecture).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch.nn as nn

from hpcgan import CONFIG_DIR
from hpcgan.augment import parse_policy
from hpcgan.images import check_image_size
from hpcgan.models.builders import CRITICS, GENERATORS
from hpcgan.models.twins import TWIN_DIM, fit_class_noise
from hpcgan.settings import SettingsError, check_choice, check_range, parse

MODEL_NAMES = ("wgan_gp_ac", "acgan", "wgan", "wgan_gp", "infogan", "wgan_gp_info", "dcgan", "cgan", "sngan_proj",
               "cellgan")
ADVERSARIAL = ("wasserstein", "bce", "hinge")   # the adversarial losses of hpcgan/objectives.py
CBN_GENERATORS = ("dcgan_cbn", "resnet_cbn")    # generators with class-conditional batch norm (gSR, class_from)
TWIN_GENERATORS = ("dcgan_cbn",)                # generators with NoisyTwins' class-embedding mapping


@dataclass
class OptimSpec:
    """A model's optimisers (one kind for G and D): configs/model/<name>.yaml `optim:`."""
    name: str = "adam"                 # "adam" | "rmsprop"
    lr: float = 1e-3                   # both networks' learning rate, unless lr_g / lr_d say otherwise
    lr_g: float | None = None          # the generator's own lr (TTUR, Heusel et al. 2017); None: lr
    lr_d: float | None = None          # the critic's own lr; None: lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])   # Adam only
    n_critic: int = 1                  # critic steps per generator step

    def __post_init__(self) -> None:
        check_choice("model.optim.name", self.name, ("adam", "rmsprop"))
        for key in ("lr", "lr_g", "lr_d"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise SettingsError(f"model.optim.{key}={value!r}: must be > 0")
        if len(self.betas) != 2:
            raise SettingsError(f"model.optim.betas={self.betas!r}: give two numbers, e.g. [0.5, 0.999]")
        check_range("model.optim.n_critic", self.n_critic, 1)


@dataclass
class GANSpec:
    name: str
    generator: str = "resnet"          # architecture name in GENERATORS
    critic: str = "resnet"             # architecture name in CRITICS
    conditional: bool = True           # G takes the class label (can generate a chosen class)
    critic_condition: str = "none"     # "none" | "projection" (label fed to the critic, CGAN)
    adversarial: str = "wasserstein"   # "wasserstein" | "bce" | "hinge"
    gp_lambda: float = 0.0             # gradient penalty weight (WGAN-GP: 10)
    r1_gamma: float = 0.0              # R1 penalty gamma/2 * E||grad D(real)||^2 (Mescheder et al. 2018)
    gp_every: int = 1                  # lazy penalties (GP, R1): every k-th critic step, weighted k x (1 = every step)
    clip: float = 0.0                  # critic weight clipping (WGAN: 0.01)
    spectral_norm: bool = False        # spectral normalisation of every critic weight (Miyato et al. 2018)
    ac_weight: float = 0.0             # auxiliary classifier loss weight (AC-GAN, WGAN-GP-AC)
    ac_twin: bool = False              # TAC-GAN twin classifier: unbiased conditioning, no class prototypes
    info_cat: int = 0                  # InfoGAN categorical code size
    info_cont: int = 0                 # InfoGAN continuous codes
    info_weight: float = 0.0
    mode_seeking: float = 0.0          # mode-seeking regularisation weight (MSGAN, Mao et al. 2019; 0 = off)
    gsr_weight: float = 0.0            # group spectral regularisation of the generator's class-conditional batch
                                       # norms (gSR, Rangwani et al. ECCV 2022; hpcgan.objectives.gsr_penalty)
    gsr_groups: int = 4                # gSR: each class's gain (and bias) vector as a gsr_groups-row matrix
    class_from: int = 0                # long-tail: generator layers below this resolution are unconditional (plain
                                       # batch norm, no label at the input), the class enters from it up: low-
                                       # resolution structure shared by every class (the generator half of UTLO,
                                       # Khorram et al. 2024); 0: every layer conditional
    utlo_alpha: float = 0.0            # long tail: the rest of UTLO: the unconditional layers (below class_from) also
                                       # draw an image at the largest power of two below class_from (16: 8 px), which
                                       # the critic scores through a low-resolution path and an unconditional head;
                                       # the adversarial loss is (L_cond + alpha L_uncond) / (1 + alpha) on both
                                       # sides (hpcgan.objectives); 0: off
    noisy_twins: float = 0.0           # long tail: NoisyTwins (Rangwani et al. CVPR 2023) Barlow Twins weight on the
                                       # mapping of noisy class embeddings (hpcgan.models.twins; 0 = off; paper 0.01)
    twin_sigma: float = 0.75           # NoisyTwins: the class-embedding noise's std for a class with many images
    ae_init: int = 0                   # long tail: BAGAN (Mariani et al. 2018; BAGAN-GP, Huang & Jafari 2021): this
                                       # many autoencoder steps (G the decoder, the critic's trunk the encoder) before
                                       # the first GAN step, then a class-conditional latent prior
                                       # (hpcgan.models.bagan); 0: off
    z_dim: int = 128
    width: int = 64                    # base channel count
    critic_norm: str = "none"          # "none" | "batch" (never with a gradient penalty)
    diffaug: list[str] = field(default_factory=list)   # the DiffAugment policy a run uses unless its own
                                                       # `diffaug` setting names one (hpcgan.train)
    optim: dict = field(default_factory=lambda: asdict(OptimSpec()))   # OptimSpec's fields

    @property
    def latent_dim(self) -> int:
        return self.z_dim + self.info_cat + self.info_cont + (TWIN_DIM if self.noisy_twins > 0 else 0)

    @classmethod
    def from_config(cls, cfg) -> "GANSpec":
        """A spec from a mapping (configs/model/<name>.yaml, a checkpoint's config["model"]): values
        type-checked and converted, the optimiser's missing keys filled from OptimSpec; a bad key, value
        or combination is a one-line SettingsError (a ValueError) naming model.<key>."""
        d = dict(cfg)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(f"model config {d.get('name')!r}: unknown keys {sorted(unknown)}")
        optim = d.pop("optim", None) or {}
        spec = parse(cls, d, prefix="model.")
        spec.optim = asdict(parse(OptimSpec, optim, prefix="model.optim."))
        check_choice("model.adversarial", spec.adversarial, ADVERSARIAL)
        check_range("model.r1_gamma", spec.r1_gamma, 0)
        check_range("model.mode_seeking", spec.mode_seeking, 0)
        check_range("model.gsr_weight", spec.gsr_weight, 0)
        check_range("model.gsr_groups", spec.gsr_groups, 1)
        check_range("model.class_from", spec.class_from, 0)
        check_range("model.noisy_twins", spec.noisy_twins, 0)
        check_range("model.twin_sigma", spec.twin_sigma, 0)
        check_range("model.ae_init", spec.ae_init, 0)
        check_range("model.utlo_alpha", spec.utlo_alpha, 0)
        if spec.utlo_alpha > 0 and not spec.class_from:
            raise SettingsError(f"{spec.name}: utlo_alpha scores the image of the generator's unconditional layers; "
                                "set class_from too (e.g. model.class_from=16), or utlo_alpha=0")
        if spec.utlo_alpha > 0 and spec.adversarial == "wasserstein" and not (spec.spectral_norm or spec.clip > 0):
            raise SettingsError(f"{spec.name}: utlo_alpha's low-resolution critic path is not under the gradient "
                                "penalty, so a Wasserstein critic would be unbounded there; use adversarial=bce or "
                                "hinge, or spectral_norm=true")
        if spec.noisy_twins > 0:
            _check_noisy_twins(spec)
        if spec.ae_init > 0:
            _check_ae_init(spec)
        if 0 < spec.class_from <= 4:
            raise SettingsError(f"model.class_from={spec.class_from}: the generators start at 4 px, so this changes "
                                "nothing; give 0 (every layer conditional) or a resolution above 4, e.g. 16")
        if (spec.gsr_weight > 0 or spec.class_from) and spec.generator not in CBN_GENERATORS:
            raise SettingsError(f"{spec.name}: gsr_weight and class_from act on class-conditional batch norms; "
                                f"generator {spec.generator!r} has none (use one of {', '.join(CBN_GENERATORS)})")
        try:
            spec.diffaug = list(parse_policy(spec.diffaug))
        except ValueError as e:
            raise SettingsError(f"model.diffaug={spec.diffaug!r}: {e}") from None
        if int(spec.gp_every) < 1:
            raise SettingsError(f"{spec.name}: gp_every must be >= 1, got {spec.gp_every}")
        if spec.ac_twin and spec.ac_weight <= 0:
            raise SettingsError(f"{spec.name}: ac_twin needs an auxiliary classifier (ac_weight > 0)")
        if (spec.gp_lambda > 0 or spec.r1_gamma > 0) and spec.critic_norm == "batch":
            raise SettingsError(f"{spec.name}: batch norm in the critic breaks the gradient penalty")
        if spec.spectral_norm and spec.clip > 0:
            raise SettingsError(f"{spec.name}: spectral_norm already bounds the critic; drop clip (weight clipping)")
        return spec


def _check_noisy_twins(spec: GANSpec) -> None:
    if spec.generator not in TWIN_GENERATORS:
        raise SettingsError(f"{spec.name}: noisy_twins needs a generator with the class-embedding mapping "
                            f"({', '.join(TWIN_GENERATORS)}), not {spec.generator!r}; e.g. model=cellgan")
    if spec.mode_seeking > 0:
        raise SettingsError(f"{spec.name}: noisy_twins and mode_seeking pair the generator's batch differently "
                            "(same noise vs same class); set one of them to 0")
    if spec.class_from:
        raise SettingsError(f"{spec.name}: noisy_twins puts the class at the generator's input, class_from="
                            f"{spec.class_from} keeps it out; set one of them to 0")


def _check_ae_init(spec: GANSpec) -> None:
    if not spec.conditional:
        raise SettingsError(f"{spec.name}: ae_init fits a latent prior per class and needs a conditional generator; "
                            "e.g. model=cellgan")
    if spec.info_cat or spec.info_cont or spec.noisy_twins > 0:
        raise SettingsError(f"{spec.name}: ae_init's prior maps the whole latent, which holds InfoGAN codes "
                            "(info_cat, info_cont) or NoisyTwins' noise here; set those to 0 or ae_init=0")


def optimiser_lr(optim: dict, net: str) -> float:
    """The learning rate of network `net` ("G" or "D") under a spec's `optim` (OptimSpec's fields):
    its own lr_g / lr_d when set (two time-scale update rule), else the shared lr."""
    own = optim.get({"G": "lr_g", "D": "lr_d"}[net])
    return float(own if own is not None else optim["lr"])


def load_spec(name: str) -> GANSpec:
    """The spec of a named model from configs/model/<name>.yaml (outside Hydra, e.g. in tests)."""
    import yaml
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return GANSpec.from_config(yaml.safe_load(path.read_text()))


def build_model(spec: GANSpec, num_classes: int, image_size: int,
                class_counts: list[int] | None = None) -> tuple[nn.Module, nn.Module]:
    """(generator, critic) for a spec; image_size one of hpcgan.images.IMAGE_SIZES; class_counts: the training
    images per class, which scale a NoisyTwins generator's class-embedding noise (hpcgan.models.twins; default:
    the same noise for every class; a checkpoint's weights carry it)."""
    from hpcgan.models import architectures  # noqa: F401  (registers the builders)
    check_image_size(image_size)
    if spec.generator not in GENERATORS:
        raise ValueError(f"{spec.name}: unknown generator architecture {spec.generator!r}; "
                         f"known: {', '.join(sorted(GENERATORS))}")
    if spec.critic not in CRITICS:
        raise ValueError(f"{spec.name}: unknown critic architecture {spec.critic!r}; "
                         f"known: {', '.join(sorted(CRITICS))}")
    generator = GENERATORS[spec.generator](spec, num_classes, image_size)
    if spec.ae_init > 0:
        from hpcgan.models.bagan import PriorGenerator
        generator = PriorGenerator(generator, num_classes, spec.latent_dim)
    if class_counts is not None:
        fit_class_noise(generator, class_counts)
    from hpcgan.models.blocks import ConditionalBatchNorm2d
    cbn_channels = [m.gain.weight.shape[1] for m in generator.modules() if isinstance(m, ConditionalBatchNorm2d)]
    if spec.gsr_weight > 0 and any(c % spec.gsr_groups for c in cbn_channels):
        raise ValueError(f"{spec.name}: gsr_groups={spec.gsr_groups} must divide the channels of every conditional "
                         f"batch norm ({sorted(set(cbn_channels))} at width {spec.width}): e.g. gsr_groups=4")
    if spec.class_from:
        if not cbn_channels:
            raise ValueError(f"{spec.name}: class_from={spec.class_from} leaves no class-conditional layer in a "
                             f"{image_size} px {spec.generator} generator: lower it")
    critic = CRITICS[spec.critic](spec, num_classes, image_size)
    if spec.spectral_norm:
        from hpcgan.models.blocks import apply_spectral_norm
        apply_spectral_norm(critic)
    penalised = spec.gp_lambda > 0 or spec.r1_gamma > 0
    if penalised and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules()):
        # the penalty is per-sample; batch norm couples the samples and invalidates it
        raise ValueError(f"{spec.name}: critic {spec.critic!r} contains batch norm but gp_lambda or r1_gamma > 0")
    return generator, critic


def critic_heads(spec: GANSpec, num_classes: int) -> dict[str, int | None]:
    """The keys D(x, y) returns for this spec -> their trailing size (None for "adv", shape [B])."""
    heads: dict[str, int | None] = {"adv": None}
    if spec.ac_weight > 0:
        heads["cls"] = num_classes
    if spec.ac_twin:
        heads["cls_twin"] = num_classes
    if spec.info_cat > 0:
        heads["q_cat"] = spec.info_cat
    if spec.info_cont > 0:
        heads["q_cont"] = spec.info_cont
    return heads


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
