import pytest
import torch

from ddpm import checkpoint
from ddpm.checkpoint import CheckpointError


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.w": torch.randn(4, 3, generator=g),
        "model.b": torch.randn(3, generator=g).to(torch.bfloat16),
        "optim.0.step": torch.tensor(7.0),
        "rng.torch": torch.randint(0, 255, (16,), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(0),
    }


META = {"step": 7, "epoch": 1, "pos": 24, "history": [{"step": 5, "loss": 0.125}], "optim_groups": [{"lr": 1e-3}]}


def test_roundtrip_tensors_and_meta(tmp_path):
    path = tmp_path / "sub" / "step-000000007.safetensors"
    checkpoint.save(path, _tensors(), META)
    tensors, meta = checkpoint.load(path)
    assert meta == META
    expected = _tensors()
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k


def test_save_moves_non_contiguous_tensors(tmp_path):
    t = torch.arange(12.0).view(3, 4).t()  # non-contiguous view
    checkpoint.save(tmp_path / "c.safetensors", {"t": t}, {})
    assert torch.equal(checkpoint.load(tmp_path / "c.safetensors")[0]["t"], t)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    for step in (1, 2):
        checkpoint.save(checkpoint.step_path(tmp_path, step), _tensors(step), {"step": step})
    checkpoint.save(checkpoint.step_path(tmp_path, 2), _tensors(3), {"step": 2})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001.safetensors", "step-000000002.safetensors"]
    assert torch.equal(checkpoint.load(checkpoint.step_path(tmp_path, 2))[0]["model.w"], _tensors(3)["model.w"])


def test_step_path_and_listing_order(tmp_path):
    assert checkpoint.step_path(tmp_path, 6).name == "step-000000006.safetensors"
    for step in (10, 2, 100):
        checkpoint.save(checkpoint.step_path(tmp_path, step), {"x": torch.zeros(1)}, {})
    (tmp_path / ".step-000000200.safetensors.tmp-123").write_bytes(b"half a file")  # a killed writer's leftovers
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-000000002.safetensors", "step-000000010.safetensors", "step-000000100.safetensors"]
    assert checkpoint.list_checkpoints(tmp_path / "missing") == []


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file_is_detected(tmp_path, keep_fraction):
    path = tmp_path / "step-000000001.safetensors"
    checkpoint.save(path, _tensors(), META)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match=r"step-000000001\.safetensors is corrupt or truncated"):
        checkpoint.load(path)


def test_flipped_byte_in_tensor_data_is_detected(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, _tensors(), META)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 5] ^= 0x01  # one bit inside model.* data: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor checksum does not match"):
        checkpoint.load(path)


def test_flipped_byte_in_header_is_detected(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, _tensors(), META)
    data = bytearray(path.read_bytes())
    data[9] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)


def test_file_without_metadata_is_detected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))  # valid safetensors, but not one of our checkpoints
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_latest_valid_skips_a_corrupt_newest_checkpoint(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(checkpoint.step_path(tmp_path, step), _tensors(step), {"step": step})
    newest = checkpoint.step_path(tmp_path, 6)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"step-000000006\.safetensors is corrupt or truncated.*falling back"):
        path, tensors, meta = checkpoint.latest_valid(tmp_path)
    assert path == checkpoint.step_path(tmp_path, 4) and meta == {"step": 4}
    assert torch.equal(tensors["model.w"], _tensors(4)["model.w"])


def test_latest_valid_without_damage_does_not_warn(tmp_path, recwarn):
    for step in (2, 4):
        checkpoint.save(checkpoint.step_path(tmp_path, step), _tensors(step), {"step": step})
    assert checkpoint.latest_valid(tmp_path)[2] == {"step": 4}
    assert len(recwarn) == 0


def test_latest_valid_with_nothing_usable_is_none(tmp_path):
    assert checkpoint.latest_valid(tmp_path) is None
    checkpoint.step_path(tmp_path, 1).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        assert checkpoint.latest_valid(tmp_path) is None


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_prune_keeps_the_newest_k(tmp_path, keep):
    steps = [1, 2, 3, 10, 20]
    for step in steps:
        checkpoint.save(checkpoint.step_path(tmp_path, step), {"x": torch.tensor([float(step)])}, {"step": step})
    checkpoint.prune(tmp_path, keep)
    left = [checkpoint.load(p)[1]["step"] for p in checkpoint.list_checkpoints(tmp_path)]
    assert left == steps[-keep:]
