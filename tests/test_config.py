import pytest

from transferkit.config import RunConfig
from transferkit.errors import UserError


def make(**overrides):
    return RunConfig(**{"train": "train.csv", "model": "minilm-l6", **overrides})


def test_yaml_round_trip_keeps_every_field(tmp_path):
    config = make(epochs=5, lr=3e-4, freeze_layers=2, strategy="freeze-bottom", patience=None)
    config.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == config


def test_values_from_yaml_or_cli_strings_are_coerced_to_field_types():
    config = RunConfig.from_dict({"train": "t.csv", "model": "m", "epochs": "4", "lr": "1e-4", "baseline": "false",
                                  "patience": "none"})
    assert (config.epochs, config.lr, config.baseline, config.patience) == (4, 1e-4, False, None)
    assert RunConfig.from_dict({"train": "t.csv", "model": "m", "ema_warmup": "no"}).ema_warmup is False
    with pytest.raises(UserError, match="ema_warmup"):
        RunConfig.from_dict({"train": "t.csv", "model": "m", "ema_warmup": "maybe"})


@pytest.mark.parametrize("overrides, field", [
    ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "lr"),
    ({"schedule": "triangular"}, "schedule"),
    ({"monitor": "val_auc"}, "monitor"),
    ({"ema_decay": 1.5}, "ema_decay"),
    ({"adapt_selection": "target"}, "adapt_selection"),
    ({"warmup_ratio": 1.5}, "warmup_ratio"),
    ({"val": "v.csv", "val_fraction": 0.2}, "val_fraction"),
    ({"freeze_layers": 2}, "freeze_layers"),
    ({"text_column": "a", "image_column": "b"}, "image_column"),
    ({"train": ""}, "train"),
    ({"model": ""}, "model"),
])
def test_invalid_or_contradictory_settings_name_the_field(overrides, field):
    with pytest.raises(UserError, match=field):
        make(**overrides)


def test_unknown_field_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown field.*epoch_count.*known fields"):
        RunConfig.from_dict({"train": "t.csv", "model": "m", "epoch_count": 3})


def test_non_numeric_value_is_a_user_error():
    with pytest.raises(UserError, match="'epochs' is 'three'"):
        RunConfig.from_dict({"train": "t.csv", "model": "m", "epochs": "three"})


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        RunConfig.load(bad)


def test_no_ema_warmup_on_the_command_line_reaches_the_config():
    from transferkit.cli import _fit_config, build_parser

    args = build_parser().parse_args(["fit", "--train", "t.csv", "--model", "m", "--ema-decay", "0.999",
                                      "--no-ema-warmup"])
    config, _ = _fit_config(args)
    assert config.ema_decay == 0.999 and config.ema_warmup is False
    assert _fit_config(build_parser().parse_args(["fit", "--train", "t.csv", "--model", "m"]))[0].ema_warmup is True


def test_fit_takes_its_training_data_as_data_too_like_rank_and_distill():
    from transferkit.cli import _fit_config, build_parser

    config = _fit_config(build_parser().parse_args(["fit", "--data", "t.csv", "--model", "m"]))[0]
    assert config.train == "t.csv"
