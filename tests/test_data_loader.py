"""Streaming loader: round trip, rank/worker split, seeding, resume, equal steps."""
import json
import logging

import pytest
import torch

from moe_train.data import DataConfig, build_train_loader, build_val_loader
from moe_train.data import plan
from moe_train.data.build import is_validation
from moe_train.data.synthetic import sample_id
from moe_train.data.tokenizer import Tokenizer
from tests.data_fixtures import large_synthetic, synthetic, tokenized  # noqa: F401  (fixtures)


def synth_cfg(ds, **kw) -> DataConfig:
    base = dict(manifest=ds.manifest_path, seq_len=16, micro_batch_size=4, num_workers=0,
                shuffle_buffer=8, seed=7, tail_policy="drop")
    base.update(kw)
    return DataConfig(**base)


def ids_of(batches) -> list:
    return [sample_id(row) for b in batches for row in b["input_ids"]]


def take_batches(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def decode_stream(tok: Tokenizer, batches) -> list[str]:
    """Rebuild the token stream from overlapping samples and split it at EOS."""
    stream = []
    for b in batches:
        for ids, labels, keep in zip(b["input_ids"], b["labels"], b["sample_mask"]):
            if not keep:
                continue
            full = ids.tolist() + [labels[-1].item()]
            stream += full if not stream else full[1:]
    stream = [t for t in stream if t not in (tok.pad_id, -100)]
    docs, cur = [], []
    for t in stream:
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "stream must end with EOS"
    return docs


def rows(batches) -> list:
    return sorted(tuple(r.tolist()) for b in batches for r, keep in
                  zip(b["input_ids"], b["sample_mask"]) if keep)


def test_round_trip_text_to_batches(tokenized):
    tok = Tokenizer(tokenized.model)
    cfg = DataConfig(manifest=tokenized.manifest_path, seq_len=32, micro_batch_size=1,
                     num_workers=0, shuffle_shards=False, shuffle_buffer=0,
                     val_micro_batch_size=3)   # 3: the last validation batch is padded
    train_docs = [d for d in tokenized.docs if not is_validation(d, 0.1)]
    val_docs = [d for d in tokenized.docs if is_validation(d, 0.1)]
    assert train_docs and val_docs and any(not d.isascii() for d in val_docs)
    train = list(build_train_loader(cfg, 0, 1))
    val = list(build_val_loader(cfg, 0, 1))
    assert decode_stream(tok, train) == train_docs
    assert decode_stream(tok, val) == val_docs
    # With workers the batch order is a fixed interleave of worker pieces: same samples.
    cfg.num_workers = 2
    assert rows(build_train_loader(cfg, 0, 1)) == rows(train)
    assert rows(build_val_loader(cfg, 0, 1)) == rows(val)


def test_round_trip_drop_policy_counts_tail(tokenized):
    cfg = DataConfig(manifest=tokenized.manifest_path, seq_len=32, micro_batch_size=4,
                     num_workers=0, shuffle_shards=True, shuffle_buffer=8, tail_policy="drop")
    loader = build_train_loader(cfg, 0, 1)
    seen = [tuple(r.tolist()) for b in loader for r in b["input_ids"]]
    n = tokenized.manifest["splits"]["train"]["samples"]
    assert len(seen) == len(set(seen)) == n - loader.stats()["dropped_tail_samples"]
    assert 0 < loader.stats()["dropped_tail_samples"] < 4 or n % 4 == 0


@pytest.mark.parametrize("tail_policy", ["drop", "carry"])
def test_two_ranks_two_workers_disjoint_and_complete(synthetic, tail_policy):
    cfg = synth_cfg(synthetic, num_workers=2, tail_policy=tail_policy)
    loaders = [build_train_loader(cfg, r, 2) for r in range(2)]
    carried, carried_total, dropped = [], 0, 0
    for epoch in range(3):
        per_rank = [ids_of(list(ld)) for ld in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) > 0
        assert not set(per_rank[0]) & set(per_rank[1])
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen))
        num_tail = synthetic.num_train - len(seen)     # each epoch holds every sample once
        assert 0 <= num_tail < 2 * 4
        if tail_policy == "drop":
            assert loaders[0].stats()["dropped_tail_samples"] == num_tail + dropped
            dropped += num_tail
        else:
            assert set(carried) <= set(seen)            # last epoch's tail is seen now
            carried = sorted(set(range(synthetic.num_train)) - set(seen))
            assert loaders[0].stats()["carried_samples"] == len(carried) + carried_total
            carried_total += len(carried)
        assert loaders[0].epoch == epoch + 1


def test_seeded_order_reproducible_and_seed_sensitive(synthetic):
    def run(seed, epochs=2):
        ld = build_train_loader(synth_cfg(synthetic, seed=seed), 0, 1)
        return [ids_of(list(ld)) for _ in range(epochs)]

    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a[0] != c[0]
    assert a[0] != a[1]                      # a new order every epoch
    assert sorted(a[0]) != a[0]              # actually shuffled


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 12])   # mid epoch 0, mid epoch 1
def test_resume_equals_uninterrupted(synthetic, num_workers, stop_after):
    cfg = synth_cfg(synthetic, num_workers=num_workers, tail_policy="carry")
    for rank in range(2):
        full = build_train_loader(cfg, rank, 2)
        reference = ids_of(list(full)) + ids_of(list(full))
        first = build_train_loader(cfg, rank, 2)
        seen = []
        while len(seen) < stop_after * 4:
            seen += ids_of(take_batches(first, stop_after - len(seen) // 4))
        state = json.loads(json.dumps(first.state_dict()))       # JSON-able
        resumed = build_train_loader(cfg, rank, 2)
        resumed.load_state_dict(state)
        total = len(reference)
        while len(seen) < total:
            seen += ids_of(list(resumed))
        assert seen == reference


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_the_global_rng_alone(synthetic, num_workers):
    """A resumed run restores the RNG state and then starts a new iterator; a draw from the
    global generator there (DataLoader's worker seed) would shift router jitter."""
    loader = build_train_loader(synth_cfg(synthetic, num_workers=num_workers), 0, 2)
    before = torch.get_rng_state()
    take_batches(loader, 2)
    assert torch.equal(torch.get_rng_state(), before)


def test_state_is_torch_saveable(synthetic, tmp_path):
    ld = build_train_loader(synth_cfg(synthetic), 0, 1)
    take_batches(ld, 2)
    torch.save(ld.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == ld.state_dict()


@pytest.mark.parametrize("new_world, shuffle_buffer, num_workers",
                         [(1, 8, 0), (3, 8, 2), (3, 0, 0)])
def test_resume_on_other_world_size_serves_the_rest_once(synthetic, caplog, new_world,
                                                         shuffle_buffer, num_workers):
    cfg = synth_cfg(synthetic, shuffle_buffer=shuffle_buffer, micro_batch_size=2)
    old = [build_train_loader(cfg, r, 2) for r in range(2)]
    consumed = [i for ld in old for i in ids_of(take_batches(ld, 5))]
    state = old[0].state_dict()
    cfg.num_workers = num_workers
    new = [build_train_loader(cfg, r, new_world) for r in range(new_world)]
    with caplog.at_level(logging.WARNING, logger="moe_train.data"):
        for ld in new:
            ld.load_state_dict(state)
    assert "re-split" in caplog.text
    rest = [ids_of(list(ld)) for ld in new]
    assert len({len(r) for r in rest}) == 1                     # equal steps still
    flat = [i for r in rest for i in r]
    assert len(flat) == len(set(flat)) and not set(flat) & set(consumed)
    stats = new[0].stats()
    assert stats["skipped_on_resplit"] == 0
    assert synthetic.num_train - len(consumed) - len(flat) == stats["dropped_tail_samples"]
    assert new[0].epoch == 1


def test_resplits_4_2_3_serve_every_sample_once_with_default_shuffle(large_synthetic):
    """The users' defaults (1024-sample shuffle blocks, 2 workers, carry): 4 ranks, then
    2 (in-process reading), then 3 to the end of the epoch, each re-split in the middle
    of shuffle blocks. The ledger of served ids plus the carried tail is the epoch, each
    id exactly once."""
    ds = large_synthetic
    stages = [(4, {}, 100), (2, {"num_workers": 0}, 200), (3, {}, None)]  # None: epoch end
    ledger, state = [], None
    for generation, (world, overrides, steps) in enumerate(stages):
        cfg = DataConfig(manifest=ds.manifest_path, seq_len=ds.seq_len, **overrides)
        loaders = [build_train_loader(cfg, r, world) for r in range(world)]
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(state)
            made_here = [p for p in loaders[0].state_dict()["resplit"]
                         if plan.is_slice(p) and p["key"][2] == generation - 1]
            assert made_here, "the re-split should cut shuffle blocks"
        served = [take_batches(ld, steps) if steps else list(ld) for ld in loaders]
        assert len({len(b) for b in served}) == 1 and (steps is None or len(served[0]) == steps)
        ledger += [i for b in served for i in ids_of(b)]
        states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]
        assert all(s == states[0] for s in states)                # saving rank 0 is enough
        state = states[0]
        assert all(ld.stats()["skipped_on_resplit"] == 0 for ld in loaders)
    assert state["epoch"] == 1
    carried = plan.sample_ids(state["carry_in"])
    assert 0 < len(carried) < 3 * cfg.micro_batch_size
    assert sorted(ledger + carried) == list(range(ds.num_train))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_resplit_equals_uninterrupted(synthetic, num_workers):
    """A state holding block slices resumes sample for sample on its own layout."""
    cfg = synth_cfg(synthetic, micro_batch_size=2)
    old = [build_train_loader(cfg, r, 2) for r in range(2)]
    for ld in old:
        take_batches(ld, 5)
    state = old[0].state_dict()
    cfg.num_workers = num_workers

    def resumed(rank, saved):
        ld = build_train_loader(cfg, rank, 3)
        ld.load_state_dict(saved)
        return ld

    for rank in range(3):
        reference = ids_of(list(resumed(rank, state)))
        first = resumed(rank, state)
        head = ids_of(take_batches(first, 4))
        mid = json.loads(json.dumps(first.state_dict()))
        assert any(plan.is_slice(p) for p in mid["resplit"])
        assert head + ids_of(list(resumed(rank, mid))) == reference


def test_version_1_state_resumes_and_resplits(synthetic):
    """A state saved before block slices existed (version 1: the same keys, plain ranges
    only) resumes exactly and re-splits without losing a sample; an unknown version is
    refused with what to do."""
    cfg = synth_cfg(synthetic, micro_batch_size=2, tail_policy="carry")
    old = [build_train_loader(cfg, r, 2) for r in range(2)]
    consumed = [i for ld in old for i in ids_of(take_batches(ld, 5))]
    state = dict(old[0].state_dict(), version=1)
    same = build_train_loader(cfg, 1, 2)
    same.load_state_dict(state)
    assert ids_of(list(same)) == ids_of(list(old[1]))
    new = [build_train_loader(cfg, r, 3) for r in range(3)]
    for ld in new:
        ld.load_state_dict(state)
    rest = [i for ld in new for i in ids_of(list(ld))]
    carried = plan.sample_ids(new[0].state_dict()["carry_in"])
    assert sorted(consumed + rest + carried) == list(range(synthetic.num_train))
    with pytest.raises(ValueError, match="version 99 is unknown.*moe_train version that saved"):
        build_train_loader(cfg, 0, 2).load_state_dict(dict(state, version=99))


def test_uneven_shards_equal_steps_per_rank(synthetic):
    for seed in range(5):
        for world in (2, 3, 4):
            cfg = synth_cfg(synthetic, seed=seed, num_workers=0, micro_batch_size=3)
            counts = [len(list(build_train_loader(cfg, r, world))) for r in range(world)]
            assert len(set(counts)) == 1 and counts[0] == synthetic.num_train // (3 * world)
    cfg = synth_cfg(synthetic, micro_batch_size=4)
    val = [list(build_val_loader(cfg, r, 3)) for r in range(3)]
    assert len({len(v) for v in val}) == 1
    ids = [sample_id(row) for v in val for b in v for row, keep in
           zip(b["input_ids"], b["sample_mask"]) if keep]
    assert sorted(ids) == list(range(synthetic.num_train, synthetic.num_train + synthetic.num_val))
    assert len(ids) == synthetic.num_val


def test_batch_format(synthetic):
    batch = next(iter(build_train_loader(synth_cfg(synthetic), 0, 1)))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1].clamp(min=0)) or \
        torch.equal(batch["input_ids"][:, 2:], batch["labels"][:, 1:-1])


def test_streams_http_urls_with_brace_patterns(synthetic):
    """The same samples, in the same order, whether shards are local files or URLs of a
    (loopback) HTTP server, with the manifest itself fetched over HTTP too."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=synthetic.out)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        names = [s["name"] for s in synthetic.manifest["splits"]["train"]["shards"]]
        pattern = f"{base}/train/shard-{{000000..{len(names) - 1:06d}}}.tar"
        remote = build_train_loader(synth_cfg(synthetic, manifest=f"{base}/manifest.json",
                                              train_shards=pattern, num_workers=2), 0, 1)
        local = build_train_loader(synth_cfg(synthetic, num_workers=2), 0, 1)
        got, want = ids_of(remote), ids_of(local)
        assert got == want and len(got) == remote.steps_per_epoch * 4
    finally:
        server.shutdown()
