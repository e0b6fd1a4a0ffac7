import json

import pytest

from motfusion.config import Config
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.recipes import RECIPES, get_recipe


def test_overrides_parse_by_type():
    cfg = get_recipe("debug").override(
        [
            "model.untie=ffn,attn",
            "model.dim=96",
            "model.n_heads=4",
            "model.qk_norm=false",
            "model.towers=text:shared,image:shared",
            "objective.image_first_noise_cap=none",
            "objective.cfg_dropout=0.2",
            "train.lr=1e-3",
        ]
    )
    assert cfg.model.untie == ("ffn", "attn") and cfg.model.dim == 96 and cfg.model.qk_norm is False
    assert cfg.model.towers == {"text": "shared", "image": "shared"}
    assert cfg.objective.image_first_noise_cap is None and cfg.objective.cfg_dropout == 0.2
    assert get_recipe("debug").override(["model.untie="]).model.untie == ()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "train.nope"),
        ("bogus.key=1", "bogus.key"),
        ("model.dim=abc", "model.dim"),
        ("model.untie=ffn,bogus", "model.untie"),
        ("model.dim=100", "model.n_heads"),
        ("model.image_attention=sideways", "model.image_attention"),
        ("model.towers=text", "model.towers"),
        ("objective.diffusion=edm", "objective.diffusion"),
        ("model.patch_size=5", "patch_size"),
        ("train.steps", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        get_recipe("debug").override([override])


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="available"):
        get_recipe("nope")


def test_roundtrip_through_json():
    cfg = get_recipe("demo").override(["model.untie=ffn", "objective.image_first_noise_cap=none"])
    back = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_paper_recipes_have_paper_shapes():
    sizes = {"163m": (16, 768, 12), "760m": (24, 1536, 24), "1.4b": (24, 2048, 16), "7b": (32, 4096, 32)}
    for name, (layers, dim, heads) in sizes.items():
        m = get_recipe(name).model
        assert (m.n_layers, m.dim, m.n_heads) == (layers, dim, heads)
    assert {"debug", "demo"} <= set(RECIPES)


def test_every_small_recipe_builds():
    for name in ("debug", "demo"):
        cfg = get_recipe(name)
        assert TransfusionModel(cfg.model, 272).num_params() > 0
