"""Hardening: checksummed, config-bound checkpoints, atomic writes, and the NaN guard's resume point."""

from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch

from dnis.data.dataset import EncodedDataset
from dnis.errors import DnisError
from dnis.io import atomic_write
from dnis.models.base import Model
from dnis.tasks import make_task
from dnis.train import Progress, TrainConfig, Trainer
from dnis.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from dnis.train.trainer import train_config_hash

HASH = "0123abcd"


def sample_state() -> dict:
    torch.manual_seed(0)
    return {
        "epoch": 2,
        "model": {"w": torch.randn(64, 8), "b": torch.zeros(8)},
        "history": [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}],
        "note": "a" * 200,
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "model":
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), name
        else:
            assert a[key] == b[key], key


def refused(path: Path, expected_hash: str | None = HASH, match: str | None = None) -> str:
    """Load must raise DnisError naming the file and the fix; returns the message."""
    with pytest.raises(DnisError, match=match) as info:
        load_checkpoint(path, expected_hash)
    message = str(info.value)
    assert str(path) in message
    assert "without --resume" in message
    return message


# ---------------------------------------------------------------- checkpoint integrity


def test_good_checkpoint_loads(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    state = sample_state()
    save_checkpoint(path, state, HASH)
    assert_same_state(load_checkpoint(path, HASH), state)
    assert_same_state(load_checkpoint(path), state)  # integrity only
    found, again = read_checkpoint(path)
    assert found == HASH
    assert_same_state(again, state)
    envelope = torch.load(path, weights_only=True)  # the documented on-disk format
    assert envelope["format"] == 1 and envelope["config_hash"] == HASH
    assert envelope["sha256"] == hashlib.sha256(envelope["payload"]).hexdigest()


def test_bit_flip_in_the_middle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, sample_state(), HASH)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    refused(path, match="corrupt")


def test_bit_flips_anywhere_never_load_a_different_state(tmp_path: Path) -> None:
    """A flip in zip padding may be harmless; otherwise it must be refused, never loaded changed."""
    path = tmp_path / "checkpoint.pt"
    state = sample_state()
    save_checkpoint(path, state, HASH)
    good = path.read_bytes()
    for at in range(0, len(good), max(1, len(good) // 97)):
        data = bytearray(good)
        data[at] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            loaded = load_checkpoint(path, HASH)
        except DnisError as error:
            assert str(path) in str(error)
            continue
        assert_same_state(loaded, state)


def test_payload_tampered_inside_a_valid_envelope_is_refused_by_the_checksum(
    tmp_path: Path,
) -> None:
    """The zip container stays valid and the pickle still loads: only the SHA-256 catches it."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, sample_state(), HASH)
    envelope = torch.load(path, weights_only=True)
    payload = envelope["payload"]
    at = payload.index(b"a" * 200)
    envelope["payload"] = payload[:at] + b"b" + payload[at + 1 :]
    assert torch.load(io.BytesIO(envelope["payload"]), weights_only=False)["note"][0] == "b"
    torch.save(envelope, path)
    refused(path, match="checksum")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999, 0.0])
def test_truncated_checkpoint_is_refused(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, sample_state(), HASH)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    refused(path, match="corrupt|not a")


@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all\n", b"\x80\x02K\x01.", b"PK\x03\x04garbage"],
    ids=["text", "pickle-int", "fake-zip"],
)
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    refused(path)


def test_an_old_format_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save(sample_state(), path)  # a plain state, as dnis wrote before format 1
    refused(path, match="not a dnis checkpoint")


def test_a_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    refused(tmp_path / "nope.pt", match="does not exist")


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, sample_state(), HASH)
    message = refused(path, expected_hash="ffff0000", match="different config")
    assert HASH in message and "ffff0000" in message


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    state = sample_state()
    save_checkpoint(path, state, HASH)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails in torch/pickle
        save_checkpoint(path, {**state, "bad": lambda: None}, HASH)
    assert_same_state(load_checkpoint(path, HASH), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------- atomic writes


class Boom(Exception):
    pass


def half_then_raise(data: bytes):
    def write(handle) -> None:
        handle.write(data[: len(data) // 2])
        handle.flush()
        raise Boom("killed mid-write")

    return write


def test_atomic_write_keeps_the_old_file_when_the_writer_raises_midway(tmp_path: Path) -> None:
    path = tmp_path / "artifact.bin"
    old, new = b"old contents\n" * 100, b"NEW" * 1000
    atomic_write(path, lambda handle: handle.write(old))
    with pytest.raises(Boom):
        atomic_write(path, half_then_raise(new))
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]  # no temp file left behind
    atomic_write(path, lambda handle: handle.write(new))
    assert path.read_bytes() == new
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]


def test_atomic_write_leaves_no_file_when_the_first_write_raises(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "artifact.bin"
    with pytest.raises(Boom):
        atomic_write(path, half_then_raise(b"x" * 1000))
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


# ---------------------------------------------------------------- trainer: hash and NaN guard


class Poisonable(Model):
    """Wraps a model; once `poisoned`, its scores (hence the loss) are NaN."""

    def __init__(self, base: Model) -> None:
        super().__init__(base.schema, base.embedding)
        self.base = base
        self.poisoned = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scores = self.base(ids)
        return scores * float("nan") if self.poisoned else scores


class PoisonAt(Progress):
    """Poisons the model when epoch `epoch` starts; snapshots the weights the epoch before."""

    def __init__(self, model: Poisonable, epoch: int) -> None:
        self.model, self.epoch = model, epoch
        self.snapshot: dict[str, torch.Tensor] | None = None

    def epoch_start(self, epoch: int, batches: int) -> None:
        if epoch == self.epoch:
            self.model.poisoned = True

    def epoch_end(self, record: dict) -> None:
        if record["epoch"] == self.epoch - 1:
            self.snapshot = copy.deepcopy(self.model.state_dict())


CONFIG = {"epochs": 3, "batch_size": 256, "lr": 0.01, "patience": 0}


def poisonable_trainer(data, make_model, run_dir=None, progress_for=None, epochs=3, **kwargs):
    model = Poisonable(make_model(data, "fm", dim=4, seed=0))
    progress = progress_for(model) if progress_for else None
    config = TrainConfig(**{**CONFIG, "epochs": epochs})
    trainer = Trainer(model, make_task(data), config, run_dir=run_dir, progress=progress, **kwargs)
    return model, trainer, progress


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    ctr_data: EncodedDataset, make_model, tmp_path: Path
) -> None:
    model_a, trainer_a, _ = poisonable_trainer(ctr_data, make_model)
    whole = trainer_a.fit()  # healthy, uninterrupted reference

    model, trainer, progress = poisonable_trainer(
        ctr_data, make_model, tmp_path, lambda m: PoisonAt(m, 3)
    )
    with pytest.raises(DnisError, match=r"loss became nan in epoch 3") as info:
        trainer.fit()
    assert "last good checkpoint is kept" in str(info.value)
    saved = load_checkpoint(tmp_path / "checkpoint.pt", trainer.config_hash)
    assert saved["epoch"] == 2 and [r["epoch"] for r in saved["history"]] == [1, 2]
    assert progress.snapshot is not None
    for name, tensor in progress.snapshot.items():
        assert torch.equal(saved["model"][name], tensor), name
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]

    model_b, trainer_b, _ = poisonable_trainer(ctr_data, make_model, tmp_path)  # healthy again
    resumed = trainer_b.fit(resume=True)
    assert without_times(resumed.history) == without_times(whole.history)
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(model_b.state_dict()[name], tensor), name


def test_trainer_config_hash_default_and_explicit(
    ctr_data: EncodedDataset, make_model, tmp_path: Path
) -> None:
    _, default, _ = poisonable_trainer(ctr_data, make_model)
    assert default.config_hash == train_config_hash(TrainConfig(**CONFIG))
    assert train_config_hash(TrainConfig(**{**CONFIG, "lr": 0.5})) != default.config_hash

    model, trainer, _ = poisonable_trainer(
        ctr_data, make_model, tmp_path, config_hash="run-aaaa", epochs=1
    )
    trainer.fit()
    found, _ = read_checkpoint(tmp_path / "checkpoint.pt")
    assert found == "run-aaaa"
    _, other, _ = poisonable_trainer(
        ctr_data, make_model, tmp_path, config_hash="run-bbbb", epochs=1
    )
    with pytest.raises(DnisError, match="different config.*run-aaaa.*run-bbbb"):
        other.fit(resume=True)
    _, same, _ = poisonable_trainer(
        ctr_data, make_model, tmp_path, config_hash="run-aaaa", epochs=1
    )
    assert same.fit(resume=True).best_epoch == 1  # matching hash resumes (nothing left to train)


def test_trainer_refuses_to_resume_from_a_corrupt_checkpoint(
    ctr_data: EncodedDataset, make_model, tmp_path: Path
) -> None:
    _, trainer, _ = poisonable_trainer(ctr_data, make_model, tmp_path, epochs=1)
    trainer.fit()
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _, again, _ = poisonable_trainer(ctr_data, make_model, tmp_path, epochs=1)
    with pytest.raises(DnisError, match="corrupt"):
        again.fit(resume=True)
