"""Bad input: each gives a clear error naming shard and member, or a counted skip."""
import io
import os
import shutil
import tarfile

import numpy as np
import pytest

from moe_train.data import DataConfig, ShardError, TextError, build_train_loader
from moe_train.data.build import make_shards
from moe_train.data.shards import member_name, npy_bytes
from moe_train.data.tokenizer import TextStats, iter_documents
from tests.data_fixtures import synthetic, tokenized  # noqa: F401  (fixtures)

BAD = "train/shard-000002.tar"     # 20 samples


def copy_dataset(ds, tmp_path) -> str:
    out = str(tmp_path / "ds")
    shutil.copytree(ds.out, out)
    return out


def cfg_for(out, **kw) -> DataConfig:
    base = dict(manifest=os.path.join(out, "manifest.json"), seq_len=16, micro_batch_size=4,
                num_workers=0, shuffle_buffer=8, seed=3, tail_policy="drop")
    base.update(kw)
    return DataConfig(**base)


def rewrite_member(path: str, index: int, array: np.ndarray) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for i, (m, data) in enumerate(members):
            data = npy_bytes(array) if i == index else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 + 100)      # mid-member


def corrupt(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        f.write(b"\xff" * 1500)           # clobbers a header and a payload


def wrong_dtype(path):
    rewrite_member(path, 5, np.arange(17, dtype=np.uint32))


def wrong_length(path):
    rewrite_member(path, 5, np.arange(9, dtype=np.uint16))


DAMAGE = {"truncated": truncate, "corrupt": corrupt, "dtype": wrong_dtype,
          "length": wrong_length}


def run_epoch(cfg, world=2):
    return [list(build_train_loader(cfg, r, world)) for r in range(world)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_bad_shard_raises_naming_shard_and_member(synthetic, tmp_path, damage, num_workers):
    out = copy_dataset(synthetic, tmp_path)
    DAMAGE[damage](os.path.join(out, BAD))
    with pytest.raises(ShardError) as info:
        run_epoch(cfg_for(out, num_workers=num_workers))
    msg = str(info.value)
    assert "shard-000002.tar" in msg and "DataLoader worker" not in msg
    if damage in ("dtype", "length"):
        assert info.value.member == member_name(2, 5) and "expected uint16 and (17,)" in msg


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_bad_shard_skip_is_counted_and_keeps_steps_equal(synthetic, tmp_path, damage, caplog):
    good = run_epoch(cfg_for(synthetic.out))
    out = copy_dataset(synthetic, tmp_path)
    DAMAGE[damage](os.path.join(out, BAD))
    cfg = cfg_for(out, on_error="skip", num_workers=2)
    loaders = [build_train_loader(cfg, r, 2) for r in range(2)]
    bad = [list(ld) for ld in loaders]
    assert [len(b) for b in bad] == [len(g) for g in good]      # no rank falls behind
    skipped = sum(ld.stats()["skipped_samples"] for ld in loaders)
    masked = sum(int((~b["sample_mask"]).sum()) for batches in bad for b in batches)
    assert skipped == masked > 0
    if damage in ("dtype", "length"):
        assert skipped == 1
    assert "shard-000002.tar" in caplog.text
    for batches in bad:
        for b in batches:
            assert (b["labels"][~b["sample_mask"]] == -100).all()


def test_unreadable_url_and_missing_file(synthetic, tmp_path):
    train = os.path.join(synthetic.out, "train")
    pattern = f"{train}/shard-00000{{0..1}}.tar http://127.0.0.1:9/train/shard-000002.tar"
    cfg = cfg_for(synthetic.out, train_shards=pattern, read_timeout_s=5.0)
    with pytest.raises(ShardError, match=r"127\.0\.0\.1:9/train/shard-000002\.tar.*cannot open"):
        run_epoch(cfg, world=1)
    out = copy_dataset(synthetic, tmp_path)
    os.remove(os.path.join(out, BAD))
    with pytest.raises(ShardError, match="shard-000002.tar.*cannot open"):
        run_epoch(cfg_for(out), world=1)


def test_empty_or_foreign_shard_lists(synthetic):
    with pytest.raises(ValueError, match="data.train_shards.*not a shard"):
        build_train_loader(cfg_for(synthetic.out, train_shards="/x/other-{0..3}.tar"), 0, 1)
    with pytest.raises(ValueError, match="data.manifest is empty"):
        build_train_loader(DataConfig(seq_len=16), 0, 1)
    with pytest.raises(ValueError, match="split 'nope'"):
        build_train_loader(cfg_for(synthetic.out, train_split="nope"), 0, 1)
    with pytest.raises(ValueError, match="data.seq_len=32"):
        build_train_loader(cfg_for(synthetic.out, seq_len=32), 0, 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_loader(cfg_for(synthetic.out, micro_batch_size=64), 0, 2)


def test_pipe_sources_need_opt_in(synthetic):
    shard = os.path.join(synthetic.out, "train", "shard-000000.tar")
    with pytest.raises(ValueError, match="data.allow_pipe"):
        build_train_loader(cfg_for(synthetic.out, train_shards=f"pipe:cat {shard}"), 0, 1)
    cfg = cfg_for(synthetic.out, train_shards=f"pipe:cat {shard}", allow_pipe=True)
    assert len(list(build_train_loader(cfg, 0, 1))) == 13 // 4
    cfg = cfg_for(synthetic.out, train_shards="pipe:exit 3 # shard-000000.tar",
                  allow_pipe=True)
    with pytest.raises(ShardError, match="shard-000000.tar"):
        list(build_train_loader(cfg, 0, 1))


def test_config_validation_names_field():
    for kw, field in [(dict(micro_batch_size=0), "data.micro_batch_size=0"),
                      (dict(tail_policy="pad"), "data.tail_policy='pad'"),
                      (dict(on_error="ignore"), "data.on_error='ignore'"),
                      (dict(num_workers=-1), "data.num_workers=-1"),
                      (dict(read_timeout_s=0), "data.read_timeout_s=0")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            DataConfig(**kw).validate()
    DataConfig().validate()


def test_non_utf8_text_errors_or_is_counted(tmp_path, tokenized):
    path = tmp_path / "bad.txt"
    path.write_bytes("good line é\n".encode() + b"bad \xff\xfe line\n" + b"fine\n\nnext\n")
    with pytest.raises(TextError, match=r"bad\.txt:2: not valid UTF-8"):
        list(iter_documents([str(path)]))
    stats = TextStats()  # the bad line leaves its block; the block stays one document
    assert list(iter_documents([str(path)], on_error="skip", stats=stats)) == \
        ["good line é\nfine", "next"]
    assert stats.skipped_lines == 1
    with pytest.raises(TextError, match=r"bad\.txt:2"):
        make_shards([str(path)], tokenized.model, str(tmp_path / "o"), seq_len=8)
    manifest = make_shards([str(path)], tokenized.model, str(tmp_path / "o"), seq_len=8,
                           on_error="skip")
    assert manifest["skipped_input_lines"] == 1
