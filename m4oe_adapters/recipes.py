"""Training recipes: one per modality, in one place, so the zoo, the examples and users train the same way.

A recipe says what data an adapter is trained and tested on (datasets, training site, unseen sites) and how it is
trained: input size and resize mode, batch, learning rate, and when to stop. Training stops at whichever comes first:

* validation Dice has not improved for ``patience`` validations (one every ``val_every`` steps): converged;
* ``max_steps`` optimiser steps;
* ``cpu_budget_minutes`` of wall time (the stated CPU budget, one thread of a shared 2-core CPU).

and keeps the weights of the best validation Dice. Validation images come from the training site's development
images only (``val_count`` of them), never from test images or from unseen sites.

    recipe = RECIPES["fundus"]; config = recipe.train_config(seed=0)   # → m4oe_adapters.training.TrainConfig

The budgets are stated, not measured for convergence. The zoo was rebuilt with these recipes on 2026-11-28
(``examples/build_zoo.py``; every recipe stopped by patience or its step cap, none by the wall-time budget); its Dice
per adapter is in ``adapters_zoo/README.md``, not here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """How one modality's adapter is trained. Sizes in pixels, budget in minutes of wall time.

    Attributes:
        name: adapter name (file ``<name>.safetensors`` in the zoo).
        modality: modality of the manifest rows (also selects the intensity preset).
        datasets: manifest datasets the recipe reads (training site and unseen sites).
        train_site: site whose development images train and validate.
        unseen_sites: sites only ever tested on (and excluded from backbone pretraining).
        extra_train_sites: further sites whose development images also train and validate (each site's held-out
            images are tested in-domain).
        resize_mode: ``crop`` (native-resolution crops, sliding windows at prediction) or ``resize``.
        size: training input size (multiple of 32).
        batch_size, lr: AdamW batch and peak learning rate (cosine decay over ``max_steps``).
        max_steps: step cap.
        val_every: steps between validations.
        patience: validations without a better Dice before stopping.
        cpu_budget_minutes: wall-time cap.
        val_count: development images held out for validation.
        rank: LoRA rank of each expert.
        in_zoo: whether ``examples/build_zoo.py`` builds it by default (one adapter per modality in the zoo).
        preset: intensity preset; ``None``: the modality's (:func:`~m4oe_adapters.presets.known_modality`).
        augment: training augmentation, ``"basic"`` or ``"site"`` (:mod:`m4oe_adapters.data.datasets`).
    """

    name: str
    modality: str
    datasets: tuple[str, ...]
    train_site: str
    unseen_sites: tuple[str, ...] = ()
    extra_train_sites: tuple[str, ...] = ()
    resize_mode: str = "resize"
    size: int = 224
    batch_size: int = 4
    lr: float = 2e-3
    max_steps: int = 2000
    val_every: int = 100
    patience: int = 5
    cpu_budget_minutes: float = 45.0
    val_count: int = 4
    rank: int = 8
    in_zoo: bool = True
    preset: dict[str, Any] | None = None
    augment: str = "basic"
    notes: str = field(default="", compare=False)

    @property
    def train_sites(self) -> tuple[str, ...]:
        """Every site whose development images train this recipe's adapter."""
        return (self.train_site, *self.extra_train_sites)

    def train_config(self, seed: int = 0):
        """The :class:`~m4oe_adapters.training.TrainConfig` of this recipe."""
        from .training import TrainConfig

        return TrainConfig(steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, val_every=self.val_every,
                           patience=self.patience, seed=seed, max_minutes=self.cpu_budget_minutes)

    def as_metadata(self) -> dict[str, Any]:
        """JSON-able description stored in the adapter's provenance (``recipe``)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in [
    Recipe("fundus", "fundus", ("DRIVE", "CHASE_DB1"), "DRIVE", ("CHASE_DB1",), resize_mode="crop",
           preset={"kind": "clahe", "tiles": 8, "clip": 0.01}, cpu_budget_minutes=90.0,
           notes="thin vessels: native-resolution crops; scale harmonised by the field-of-view diameter; CLAHE "
                 "(3 seeds against the ImageNet preset: DRIVE +1.0, CHASE_DB1 zero-shot +11.9, README); 90 "
                 "minutes of wall time on the shared CPU (the three seeds stopped by patience or the step cap)"),
    Recipe("fundus-drive-chase", "fundus", ("DRIVE", "CHASE_DB1"), "DRIVE", (), extra_train_sites=("CHASE_DB1",),
           resize_mode="crop", val_count=6, in_zoo=False,
           notes="two fundus sites (two cameras, adults and children), as endoscopy trains on both polyp sets: "
                 "CHASE_DB1 split by child, its photographs resampled to DRIVE's field of view when training"),
    Recipe("endoscopy", "endoscopy", ("CVC-ClinicDB", "Kvasir-SEG"), "CVC-ClinicDB", (),
           extra_train_sites=("Kvasir-SEG",), val_count=24, max_steps=1500, patience=100,
           notes="both full polyp sets, as the field trains polyp models (PraNet, Polyp-PVT: Kvasir-SEG + "
                 "CVC-ClinicDB) for sites it has never seen; the _subset folders are parts of them and are not "
                 "used. The full cosine schedule, no early stop: 35 validation images chose 1500 steps over 600 "
                 "and over stopping by patience (step 700 of a 2000-step schedule), README"),
    Recipe("endoscopy-clinicdb", "endoscopy", ("CVC-ClinicDB", "Kvasir-SEG"), "CVC-ClinicDB", ("Kvasir-SEG",),
           in_zoo=False,
           notes="CVC-ClinicDB only, Kvasir-SEG unseen: the source of the few-label polyp study and the zoo's "
                 "endoscopy adapter until 2026-11-28"),
    Recipe("xray", "xray", ("CXR_COVID_GeneralBlockchain", "CXR_lung_imlab_demo"), "COVID-CXR-GeneralBlockchain",
           ("imlab-demo",)),
    Recipe("dermoscopy", "dermoscopy", ("PH2",), "PH2"),
    Recipe("ultrasound-breast", "ultrasound", ("BUSI",), "BUSI"),
    Recipe("ultrasound-fetal-head", "ultrasound", ("HC18_fetal_head_US",), "HC18"),
    Recipe("CT-lung-infection", "CT", ("COVID19_CT_MedSeg_InfNet",), "MedSeg-COVID19CT",
           preset={"kind": "percentile", "low": 0.5, "high": 99.5},
           notes="8-bit JPEG slices without Hounsfield units: the percentile preset the zoo adapter was built with"),
    Recipe("MRI-cardiac", "MRI", ("ACDC_cardiac_MRI_SSL4MIS_h5",), "ACDC", max_steps=3000, cpu_budget_minutes=60.0,
           notes="150 steps predicted background everywhere, 400 reached 49.8 Dice (RV not learnt): longer cap"),
    Recipe("electron-microscopy", "electron_microscopy", ("ISBI2012_EM",), "ISBI2012", resize_mode="crop"),
]}


def recipe_for(name: str) -> Recipe:
    """The recipe named ``name`` (an adapter name such as ``fundus`` or ``MRI-cardiac``)."""
    if name not in RECIPES:
        raise ConfigError(f"no recipe named {name!r}; known: {', '.join(RECIPES)} (m4oe_adapters/recipes.py)")
    return RECIPES[name]
