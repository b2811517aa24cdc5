import pytest
import torch

from ddpm.checkpoint import CheckpointError
from ddpm.config import ModelConfig
from ddpm.export import load_model, load_state_checked, save_model
from ddpm.schedule import NoiseSchedule
from ddpm.unet import Attention, UNet, build_unet, timestep_embedding

TINY = dict(base_channels=8, channel_mults=(1, 2, 2), blocks_per_level=1, attention_heads=2)
# HF Diffusion Models Course, unit 1: UNet2DModel(sample_size=32, block_out_channels=(64, 128, 128, 256),
# layers_per_block=2, attention in the two lowest-resolution levels). diffusers' model has ~18.5 M parameters.
COURSE = dict(channels=3, resolution=32, base_channels=64, channel_mults=(1, 2, 2, 4), blocks_per_level=2,
              attention_resolutions=(8, 4))
COURSE_PARAMETERS = 18_536_323


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", [28, 32, 64])
def test_output_shape_equals_input_shape(channels, resolution):
    torch.manual_seed(0)
    net = UNet(channels, resolution, attention_resolutions=(resolution // 4,), dropout=0.1, **TINY)
    x = torch.randn(2, channels, resolution, resolution)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_output_depends_on_input_and_timestep():
    """The zero-initialised output conv makes a fresh net output 0; after one perturbation both inputs matter."""
    torch.manual_seed(0)
    net = UNet(1, 8, channel_mults=(1, 2), base_channels=8, attention_resolutions=(4,), attention_heads=2)
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(net(x, torch.tensor([3])), torch.zeros_like(x))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a, b = net(x, torch.tensor([3])), net(x, torch.tensor([7]))
    assert not torch.allclose(a, b) and not torch.allclose(a, net(x + 0.1, torch.tensor([3])))


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    # dim 4 -> frequencies 1 and 1e-2: [cos(t), cos(t/100), sin(t), sin(t/100)]
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(emb[1], torch.tensor([0.5403023, 0.99995, 0.84147096, 0.00999983]))
    assert timestep_embedding(torch.tensor([5]), 5).shape == (1, 5)  # odd dims are padded


def test_unsupported_resolution_names_it_and_the_multiple():
    with pytest.raises(ValueError, match=r"resolution 30 .*3 levels.*multiple of 2\*\*\(levels-1\) = 4"):
        UNet(1, 30, base_channels=8, channel_mults=(1, 2, 2), attention_resolutions=())
    with pytest.raises(ValueError, match=r"resolution 4 .*4 levels.* = 8"):
        UNet(1, 4, base_channels=8, channel_mults=(1, 2, 2, 2), attention_resolutions=())


def test_attention_resolution_matching_no_level_is_an_error():
    with pytest.raises(ValueError, match=r"attention_resolutions \[5\] match no level; level resolutions are \[28, 14, 7\]"):
        UNet(1, 28, attention_resolutions=(7, 5), **TINY)


def test_channels_other_than_1_or_3_are_an_error():
    with pytest.raises(ValueError, match=r"channels=2 .*1 or 3"):
        UNet(2, 8, base_channels=8, channel_mults=(1, 2), attention_resolutions=())


def test_attention_heads_must_divide_channels():
    with pytest.raises(ValueError, match=r"attention channels 8 not divisible by attention_heads=3"):
        UNet(1, 8, base_channels=8, channel_mults=(1, 2), attention_resolutions=(8,), attention_heads=3)


def test_course_unit1_configuration_parameter_count():
    net = UNet(**COURSE)
    print(f"course unit-1 UNet: {net.num_parameters():,} parameters")
    assert net.num_parameters() == COURSE_PARAMETERS
    # attention at 8x8 and 4x4: 2 down blocks and 3 up blocks per level, plus the middle block
    assert sum(isinstance(m, Attention) for m in net.modules()) == 2 * 2 + 2 * 3 + 1
    x = torch.randn(1, 3, 32, 32)
    assert net(x, torch.tensor([10])).shape == x.shape


def test_build_unet_from_config():
    net = build_unet(ModelConfig(), channels=1, resolution=28)  # params.yaml defaults: Fashion-MNIST
    assert net.config["channel_mults"] == [1, 2, 2] and net.config["attention_resolutions"] == [7]
    assert net(torch.zeros(1, 1, 28, 28), torch.tensor([0])).shape == (1, 1, 28, 28)


def test_one_batch_overfits():
    """60 Adam steps on one fixed batch (8 images 8x8, fixed t and noise) must drive the loss down >100x
    (measured: 0.95 -> 4e-4)."""
    torch.manual_seed(0)
    net = UNet(1, 8, base_channels=8, channel_mults=(1, 2), blocks_per_level=1, attention_resolutions=(4,))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 8, 8, generator=g)
    t = torch.full((8,), 3)
    x_t = NoiseSchedule.from_name("cosine", 10).q_sample(x0, t, noise)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (net(x_t, t) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5
    assert losses[-1] < losses[0] / 100, losses[::10]


def _tiny(**kw):
    torch.manual_seed(0)
    return UNet(1, 8, **{**dict(base_channels=8, channel_mults=(1, 2), attention_resolutions=(4,)), **kw})


def test_load_state_checked_names_shape_mismatch():
    small, wide = _tiny(), _tiny(base_channels=16)
    with pytest.raises(CheckpointError, match=r"file\.safetensors was saved from a different architecture: "
                                              r"\d+ with other shapes \(e\.g\. .*in the file, .*in the model\)"):
        load_state_checked(small, wide.state_dict(), "file.safetensors")


def test_load_state_checked_names_missing_and_unexpected_keys():
    one, two = _tiny(blocks_per_level=1), _tiny(blocks_per_level=2)
    with pytest.raises(CheckpointError, match=r"different architecture: .*\d+ missing \(e\.g\. "):
        load_state_checked(two, one.state_dict(), "f")
    with pytest.raises(CheckpointError, match=r"different architecture: .*\d+ unexpected \(e\.g\. "):
        load_state_checked(one, two.state_dict(), "f")


def test_load_state_checked_loads_a_matching_state():
    a, b = _tiny(), _tiny()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    load_state_checked(b, a.state_dict(), "f")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_load_model_round_trip_and_architecture_mismatch(tmp_path):
    net = _tiny(dropout=0.1)
    path = tmp_path / "model.safetensors"
    save_model(path, net, "cosine", 10, "v", extra={"steps": 3})
    loaded = load_model(path)
    assert loaded.objective == "v" and loaded.schedule.T == 10 and loaded.meta["steps"] == 3
    assert not loaded.unet.training and loaded.unet.config == net.config
    assert all(torch.equal(x, y) for x, y in zip(net.state_dict().values(), loaded.unet.state_dict().values()))

    # meta says one architecture, the tensors come from another
    other = tmp_path / "other.safetensors"
    save_model(other, _tiny(base_channels=16), "cosine", 10, "v")
    from ddpm import checkpoint

    tensors, _ = checkpoint.load(other)
    _, meta = checkpoint.load(path)
    checkpoint.save(other, tensors, meta)
    with pytest.raises(CheckpointError, match=r"other\.safetensors was saved from a different architecture"):
        load_model(other)


def test_load_model_rejects_a_non_model_file(tmp_path):
    from ddpm import checkpoint

    checkpoint.save(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"step": 1})
    with pytest.raises(CheckpointError, match=r"is not a ddpm-unet/1 model file \(format None\)"):
        load_model(tmp_path / "x.safetensors")


def test_a_zero_terminal_snr_model_loads_with_its_schedule(tmp_path):
    save_model(tmp_path / "m.safetensors", _tiny(), "linear", 100, "v", zero_terminal_snr=True)
    save_model(tmp_path / "plain.safetensors", _tiny(), "linear", 100, "v")
    assert float(load_model(tmp_path / "m.safetensors").schedule.alpha_bar[-1]) == 0.0
    assert float(load_model(tmp_path / "plain.safetensors").schedule.alpha_bar[-1]) > 0.0
