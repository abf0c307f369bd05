import pytest

from model.config import ConfigError, ModelConfig, SegModuleConfig


def test_defaults_are_the_released_recipe():
    cfg = ModelConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (32, 16, 0.05, ("q_proj", "v_proj"))
    assert cfg.seg.in_slices == 9 and cfg.seg.image_size == 512 and cfg.seg.grid_size == 16
    assert cfg.image_pixels == 512 * 512
    assert (cfg.loss.ce, cfg.loss.dice, cfg.loss.bce) == (1.0, 1.0, 1.0)


def test_round_trip_through_dict():
    cfg = ModelConfig(base_model="base", lora=None, seg=SegModuleConfig(features=(8, 16), strides=(1, 2), image_size=64))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data, message", [
    ({"lora": {"rank": 4}}, r"unknown key\(s\) in model.lora: rank"),
    ({"lora": {"r": "big"}}, "model.lora.r must be int"),
    ({"seg": {"features": [8, 16], "strides": [1, 2, 2]}}, "same length"),
    ({"seg": {"image_size": 500}}, "divisible by the total stride 32"),
    ({"seg": {"in_slices": 8}}, "must be odd"),
    ({"dtype": "int8"}, "model.dtype"),
    ({"loss": {"dice": -1}}, "loss.dice"),
    ({"lora": {"target_modules": ["q_proj; rm"]}}, "module names"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_missing_base_model_folder_is_a_clear_error(tmp_path):
    from model.omniabnorm import build_model

    with pytest.raises(ConfigError, match="no config.json"):
        build_model(ModelConfig(base_model=str(tmp_path / "nowhere")))
