from pathlib import Path

import pytest
import yaml

from ddpm import config
from ddpm.config import Config, ConfigError


def test_defaults_match_params_yaml():
    """The committed params.yaml spells out every default, so the two cannot drift apart."""
    root = Path(__file__).resolve().parent.parent
    raw = yaml.safe_load((root / "params.yaml").read_text())
    assert raw == Config().to_dict()
    assert config.load(root / "params.yaml") == Config()


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key train\.stepz.*did you mean 'steps'"):
        config.from_dict({"train": {"stepz": 10}})


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*did you mean 'train'"):
        config.from_dict({"trian": {"steps": 10}})


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "steps", "many", r"train\.steps='many' must be an integer, not str"),
    ("train", "steps", 1.5, r"train\.steps=1\.5 must be an integer"),
    ("train", "steps", True, r"train\.steps=True must be an integer, not bool"),
    ("train", "lr", "fast", r"train\.lr='fast' must be a number"),
    ("train", "hflip", 1, r"train\.hflip=1 must be true or false"),
    ("model", "channel_mults", 2, r"model\.channel_mults=2 must be a list of int"),
    ("model", "channel_mults", [1, "2"], r"model\.channel_mults\[1\]='2' must be an integer"),
    ("sample", "sampler", "euler", r"sample\.sampler='euler' is not valid; choose one of ddpm, ddim, dpm_solver\+\+"),
    ("diffusion", "schedule", "quadratic", r"diffusion\.schedule='quadratic'.*linear, cosine, sigmoid"),
    ("train", "steps", 0, r"train\.steps=0 must be > 0"),
    ("prepare", "channels", 2, r"prepare\.channels=2 must be 0 \(auto\), 1 or 3"),
])
def test_bad_values_are_named(section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict({section: {key: value}})


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        config.from_dict({"train": [1, 2]})


def test_numbers_in_exponent_form_are_floats():
    # PyYAML reads "1e-4" (no dot) as a string; DVC writes numbers that way.
    cfg = config.from_dict({"train": {"lr": "1e-4", "weight_decay": 0}})
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.weight_decay, float)


def test_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 5}}))
    cfg = config.load(path, ["train.steps=7", "train.lr=3e-4", "model.channel_mults=[1, 2]", "sample.sampler=ddim"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.channel_mults, cfg.sample.sampler) == (7, 3e-4, (1, 2), "ddim")
    assert cfg.prepare == config.PrepareConfig()


@pytest.mark.parametrize("text,message", [
    ("train.steps", "must look like section.key=value"),
    ("steps=5", "must name one section and one key"),
    ("train.steps.x=5", "must name one section and one key"),
])
def test_malformed_overrides(text, message):
    with pytest.raises(ConfigError, match=message):
        config.parse_override(text)


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_flat_names_every_parameter_once():
    flat = Config().flat()
    assert flat["train.lr"] == 1e-3 and flat["model.channel_mults"] == [1, 2, 2]
    assert len(flat) == sum(len(v) for v in Config().to_dict().values())


def test_zero_terminal_snr_with_the_eps_objective_is_refused():
    with pytest.raises(ConfigError, match=r"diffusion\.zero_terminal_snr=true needs diffusion\.objective v or x0"):
        config.from_dict({"diffusion": {"objective": "eps", "zero_terminal_snr": True}})
    assert config.from_dict({"diffusion": {"objective": "x0", "zero_terminal_snr": True}}).diffusion.zero_terminal_snr


@pytest.mark.parametrize("resolution,expected", [(28, (7,)), (32, (8,)), (64, (16,))])
def test_attention_levels_fit_any_resolution(resolution, expected):
    """The default attention sits at the lowest level whatever the image size (it was [7], 28 px only)."""
    assert Config().model.attention_resolutions(resolution) == expected
    deeper = {"prepare": {"resolution": resolution},
              "model": {"channel_mults": [1, 2, 2, 2], "attention_levels": [0, -1, 3]}}
    if resolution % 8:  # four levels halve each side three times
        with pytest.raises(ConfigError, match=rf"prepare\.resolution={resolution} does not fit the UNet: with 4 "
                                              r"model\.channel_mults .* multiple of 8 \(e\.g\. 16, 24, 32, 40\)"):
            config.from_dict(deeper)
    else:
        model = config.from_dict(deeper).model
        assert model.attention_resolutions(resolution) == (resolution, resolution // 8)


@pytest.mark.parametrize("overrides,message", [
    ({"sample": {"steps": 1001}}, r"sample\.steps=1001 exceeds diffusion\.timesteps=1000"),
    ({"diffusion": {"timesteps": 10}, "sample": {"steps": 5}}, r"evaluate\.compare_steps=\[5, 10, 20\] exceeds diffusion\.timesteps=10"),
    ({"tracking": {"primary_metric": "fid"}}, r"tracking\.primary_metric='fid' is not a metric the evaluate stage"),
    ({"evaluate": {"inception": False}, "tracking": {"primary_metric": "kid_inception"}},
     r"tracking\.primary_metric=kid_inception needs Inception features, and evaluate\.inception is false"),
    ({"model": {"attention_heads": 3}}, r"model\.attention_heads=3 does not divide the 64 channels of UNet level 2"),
    ({"model": {"base_channels": 18, "channel_mults": [1, 2], "attention_levels": [0]}, "prepare": {"resolution": 8}},
     r"model\.attention_heads=4 does not divide the 18 channels of UNet level 0"),
    ({"pipeline": {"train_timeout_s": -5}}, r"pipeline\.train_timeout_s=-5 must be >= 0"),
])
def test_the_whole_pipeline_is_checked_across_sections(overrides, message):
    """What a stage would refuse minutes into a run is refused when the config loads."""
    with pytest.raises(ConfigError, match=message):
        config.from_dict(overrides)


def test_attention_level_outside_the_unet_and_the_old_key_are_named():
    with pytest.raises(ConfigError, match=r"model\.attention_levels=\[3\] has \[3\]: with 3 channel_mults "
                                          r"the levels are 0\.\.2"):
        config.from_dict({"model": {"attention_levels": [3]}})
    with pytest.raises(ConfigError, match=r"model\.attention_resolutions is now model\.attention_levels"):
        config.from_dict({"model": {"attention_resolutions": [7]}})
