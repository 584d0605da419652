"""The clean reference backbone (adapters_zoo/backbone) never saw an image of a site that any report calls
unseen: its config.json exclusion list covers every unseen site of the zoo adapters, the README and the recipes, and
(with the shared data) no excluded site's image is in its pretraining image list."""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from m4oe_adapters.adapter_file import read_adapter
from m4oe_adapters.data import data_root
from m4oe_adapters.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
CLEAN = REPO / "adapters_zoo" / "backbone"
DATA = data_root()


@pytest.fixture(scope="module")
def provenance() -> dict:
    return json.loads((CLEAN / "config.json").read_text())["m4oe"]


@pytest.fixture(scope="module")
def excluded(provenance) -> set[str]:
    return set(provenance["excluded_sites"])


def test_every_site_a_zoo_adapter_reports_as_unseen_is_excluded(excluded):
    reported = set()
    for path in sorted((REPO / "adapters_zoo").glob("*.safetensors")):
        metadata, _ = read_adapter(path)
        reported |= set((metadata.get("metrics") or {}).get("unseen_sites") or [])
    assert reported, "the zoo adapters should report unseen sites (fundus, endoscopy, xray)"
    assert reported <= excluded


def test_every_site_the_readme_calls_unseen_is_excluded(excluded):
    # the README names each site-generalisation pair "TRAIN → UNSEEN:" or "(TRAIN → UNSEEN)"
    pairs = re.findall(r"([A-Za-z0-9_-]+) → ([A-Za-z0-9_-]+)(?=[:)])", (REPO / "README.md").read_text())
    unseen = {target for _, target in pairs}
    assert {"CHASE_DB1", "Kvasir-SEG", "imlab-demo"} <= unseen
    assert unseen <= excluded


def test_every_recipes_unseen_site_and_both_polyp_sites_are_excluded(excluded):
    assert {site for recipe in RECIPES.values() for site in recipe.unseen_sites} <= excluded
    assert {"Kvasir-SEG", "CVC-ClinicDB"} <= excluded  # ClinicDB → Kvasir and Kvasir → ClinicDB


@pytest.mark.real_data
@pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason="real data not found (set M4OE_DATA)")
def test_no_image_of_an_excluded_site_is_in_the_pretraining_images(provenance, excluded):
    with open(DATA / "manifest.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    banned_files = {row["image"] for row in rows if row["site"] in excluded or row["dataset"] in excluded}
    banned_datasets = {row["dataset"] for row in rows if row["site"] in excluded}
    # every dataset of an excluded site (its _subset folders too) was left out
    assert {"CHASE_DB1", "Kvasir-SEG", "Kvasir-SEG_subset", "CVC-ClinicDB", "CVC-ClinicDB_subset",
            "CXR_lung_imlab_demo"} <= banned_datasets
    used = [line.split("#")[0] for line in (CLEAN / "images.txt").read_text().splitlines()]
    assert len(used) == provenance["images"]
    assert not set(used) & banned_files
    assert not set(provenance["data"]) & banned_datasets
    # the per-dataset counts in config.json are the images actually used
    assert dict(Counter(name.split("/")[0] for name in used)) == provenance["data"]
    # and every used image is a manifest row (of a site that is not excluded)
    allowed = {row["image"] for row in rows} - banned_files
    assert set(used) <= allowed
