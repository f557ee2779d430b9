"""Recipes: schema, overrides, path resolution, derived values, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lnsgd.errors import LnsgdError
from lnsgd.recipe import Recipe, lambda_eff, load_recipe, lr_at, parse_override, steps_per_epoch, with_overrides

from .conftest import one_line_error

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), f"{path} should start with a comment showing how to run it"
    assert "lnsgd " in path.read_text().split("\n\n")[0] or "lnsgd " in "".join(
        line for line in path.read_text().splitlines() if line.startswith("#")
    ), f"{path}: the header should show the command that runs it"


def test_overrides_are_typed_by_the_schema(write_recipe):
    r = load_recipe(write_recipe(), ["optim.lr=0.5", "seed=3", "noise.p=0.1", "optim.full_batch=true", "log.wandb.tags=[a, b]"])
    assert r.optim.lr == 0.5 and isinstance(r.optim.lr, float)
    assert r.seed == 3 and r.noise.p == 0.1 and r.optim.full_batch is True
    assert r.log.wandb.tags == ("a", "b")


def test_recipe_is_frozen(write_recipe):
    r = load_recipe(write_recipe())
    with pytest.raises(Exception):
        r.optim.lr = 1.0  # type: ignore[misc]
    r2 = with_overrides(r, ["optim.lr=1.0"])
    assert r.optim.lr == 0.1 and r2.optim.lr == 1.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=0.5", "optim.lrr: unknown key"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("noise.p=1.0", "noise.p"),
        ("noise.p=-0.1", "noise.p"),
        ("noise.sigma=-1", "noise.sigma"),
        ("data.name=imagenet", "data.name"),
        ("model.name=vit", "model.name"),
        ("model.norm=layernorm", "model.norm"),
        ("optim.momentum=1", "optim.momentum"),
        ("train.epochs=0", "train.epochs"),
    ],
)
def test_bad_values_name_the_field(write_recipe, override, fragment):
    with pytest.raises(LnsgdError) as e:
        load_recipe(write_recipe(), [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file(write_recipe):
    with pytest.raises(LnsgdError, match=r"optim\.learning_rate: unknown key"):
        load_recipe(write_recipe({"optim": {"learning_rate": 0.1}}))


def test_inconsistent_noise_and_loss(write_recipe):
    with pytest.raises(LnsgdError, match="needs loss=cross_entropy"):
        load_recipe(write_recipe(), ["loss=mse"])
    with pytest.raises(LnsgdError, match="needs loss=mse"):
        load_recipe(write_recipe(), ["noise.kind=sign", "noise.sigma=0.5"])
    with pytest.raises(LnsgdError, match="noise.kind=smooth needs loss=cross_entropy"):
        load_recipe(write_recipe(), ["noise.kind=smooth", "loss=mse"])
    with pytest.raises(LnsgdError, match="noise.kind=smooth needs noise.p > 0"):
        load_recipe(write_recipe(), ["noise.kind=smooth", "noise.p=0"])
    assert load_recipe(write_recipe(), ["noise.kind=smooth"]).noise.p == 0.2


def test_augment_needs_an_image_dataset(write_recipe):
    assert load_recipe(write_recipe()).data.augment == "none"  # the paper trains without augmentation
    assert load_recipe(write_recipe(), ["data.augment=crop_flip"]).data.augment == "crop_flip"  # digits: (1, 8, 8)
    for name in ("mnist1d", "synthetic"):
        extra = ["loss=mse", "noise.kind=none", "noise.p=0"] if name == "synthetic" else []
        with pytest.raises(LnsgdError, match="data.augment=crop_flip needs an image dataset") as e:
            load_recipe(write_recipe(), [f"data.name={name}", "data.augment=crop_flip", *extra])
        assert "\n" not in str(e.value)
    with pytest.raises(LnsgdError, match="data.augment"):
        load_recipe(write_recipe(), ["data.augment=random"])


def test_group_size_default_depends_on_the_model(write_recipe):
    from lnsgd.models import group_size_of

    r = load_recipe(write_recipe())
    assert r.model.group_size is None
    assert group_size_of(with_overrides(r, ["model.name=resnet18"]).model) == 32  # the authors' default
    assert group_size_of(r.model) == 16
    assert group_size_of(with_overrides(r, ["model.name=resnet18", "model.group_size=8"]).model) == 8


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=1", "optim.lr 0.5", "1x=2"])
def test_malformed_override(bad):
    with pytest.raises(LnsgdError, match="expected key=value"):
        parse_override(bad)


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path: Path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    path = sub / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": "../data"}, "init": {"checkpoint": "../runs/a/final.pt"}}))
    r = load_recipe(path)
    assert r.data.root == str(tmp_path / "data")
    assert r.init.checkpoint == str(tmp_path / "runs" / "a" / "final.pt")
    assert r.log.dir == str(Path.cwd() / "runs")  # defaults are relative to where lnsgd runs


def test_lambda_and_steps_hand_computed(write_recipe):
    r = load_recipe(write_recipe(), ["loss=mse", "noise.kind=sign", "noise.sigma=0.5", "optim.lr=0.2", "optim.batch_size=8",
                                     "optim.momentum=0.9"])  # fmt: skip
    assert lambda_eff(r, 100) == pytest.approx(0.2 * 0.25 / (8 * 0.1))
    assert steps_per_epoch(r, 100) == 12  # ⌊100/8⌋, last partial batch dropped
    r = load_recipe(write_recipe(), ["optim.lr=0.1", "optim.batch_size=32"])
    assert lambda_eff(r, 200) == pytest.approx(0.1 / 32)  # flip: η/(B(1−β))
    assert lambda_eff(with_overrides(r, ["noise.kind=none", "noise.p=0"]), 200) == 0.0
    # smooth trains on the expectation itself: no sampled noise, no noise-driven regularizer.
    assert lambda_eff(with_overrides(r, ["noise.kind=smooth"]), 200) == 0.0
    # Full batch: every step averages the whole training set, B = n (not 1).
    assert lambda_eff(with_overrides(r, ["optim.full_batch=true"]), 200) == pytest.approx(0.1 / 200)
    fb = load_recipe(write_recipe(), ["loss=mse", "noise.kind=gaussian", "noise.sigma=0.5", "optim.lr=0.2",
                                      "optim.full_batch=true", "optim.momentum=0.5"])  # fmt: skip
    assert lambda_eff(fb, 40) == pytest.approx(0.2 * 0.25 / (40 * 0.5))


def test_schedules_hand_computed(write_recipe):
    r = load_recipe(write_recipe(), ["optim.lr=1.0", "train.epochs=10", "optim.schedule.kind=cosine", "optim.schedule.warmup_epochs=1"])
    spe = 10
    assert lr_at(r, 0, spe) == pytest.approx(0.1)  # warmup: (0+1)/10
    assert lr_at(r, 9, spe) == pytest.approx(1.0)
    assert lr_at(r, 10, spe) == pytest.approx(1.0)  # cosine starts at the top
    assert lr_at(r, 55, spe) == pytest.approx(0.5)  # halfway through the 90 post-warmup steps
    r = load_recipe(write_recipe(), ["optim.lr=1.0", "optim.schedule.kind=step", "optim.schedule.milestones=[2, 4]",
                                     "optim.schedule.gamma=0.5"])  # fmt: skip
    assert [lr_at(r, s, 10) for s in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_validate_command(cli, write_recipe):
    res = cli("validate", write_recipe(), "optim.lr=0.7")
    assert res.exit_code == 0
    assert "lr: 0.7" in res.output


def test_validate_lists_fields(cli, write_recipe):
    res = cli("validate", write_recipe(), "--fields")
    assert res.exit_code == 0 and "optim.lr" in res.output and "learning rate" in res.output


def test_validate_bad_input_one_line(cli, write_recipe, tmp_path):
    assert "unknown key" in one_line_error(cli("validate", write_recipe(), "optim.lrr=1"))
    assert "expected key=value" in one_line_error(cli("validate", write_recipe(), "optim.lr"))
    assert "does not exist" in one_line_error(cli("validate", tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    assert "not valid YAML" in one_line_error(cli("validate", bad))


def _leaf_fields(model, prefix=""):
    """(dotted key, FieldInfo) of every leaf field, walking the pydantic classes themselves:
    a field whose annotation is (or is Optional of) a model is a section, not a leaf."""
    from typing import get_args

    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        section = next((a for a in (info.annotation, *get_args(info.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if section is None:
            yield f"{prefix}{name}", info
        else:
            yield from _leaf_fields(section, f"{prefix}{name}.")


def test_fields_lists_every_leaf_with_type_default_and_description(cli, write_recipe):
    import json

    from lnsgd.recipe import field_help

    rows = {key: (default, meaning) for key, default, meaning in field_help()}
    leaves = dict(_leaf_fields(Recipe))
    # The optional section (null unless set) used to hide its fields.
    assert {"track.sharpness.rtol", "track.sharpness.examples", "track.sharpness.trace_method"} <= leaves.keys()
    assert sorted(leaves.keys() - rows.keys()) == []
    assert rows.keys() - leaves.keys() == {"track.sharpness"}  # its own row says it is off by default
    assert rows["track.sharpness"] == ("null", "mapping | null · periodic curvature measurements; null: none")
    for key, info in leaves.items():
        default, meaning = rows[key]
        assert info.description and meaning.endswith(" · " + info.description), key
        assert json.loads(default) == json.loads(json.dumps(info.default)), key
    # Types, written by hand from the field declarations.
    assert rows["track.sharpness.rtol"][1].startswith("float in (0, 1) | null · ")
    assert rows["track.sharpness.examples"] == ("1000", "int ≥ 1 · first N training examples used for the Hessian")
    assert rows["track.sharpness.measures"][0] == '["trace"]'
    assert rows["track.sharpness.measures"][1].startswith("list of {trace, lambda_max, trace_gn, R} · ")
    assert rows["optim.lr"] == ("0.1", "float > 0 · learning rate η")
    assert rows["noise.p"][1].startswith("float in [0, 1) · ")
    assert rows["log.wandb.tags"] == ("[]", "list of str · wandb tags")

    out = cli("validate", write_recipe(), "--fields").output
    assert "track.sharpness.rtol" in out and "track.sharpness.examples" in out
    assert "float in (0, 1) | null" in out  # rich markup must not swallow the type
