"""moe-train generate: a checkpoint loads into one process whatever ep wrote it (every
expert, by global id: the logits equal the model that was saved), greedy decoding is the
argmax, sampling is seeded and top-p keeps the nucleus, and the command line prints
samples (line breaks included) or one error line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_train.checkpoint import TrainState, save_checkpoint
import moe_train.checkpoint.manifest as manifest
from moe_train.config import config_to_dict, load_config
from moe_train.data.tokenizer import Tokenizer, train_tokenizer
from moe_train.inference.generate import decode_with_breaks, filter_top_p, generate_text, sample_tokens, unescape
from moe_train.inference.load import load_for_inference
from moe_train.model.transformer import MoETransformer
from moe_train.parallel.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.d_model=32", "model.num_heads=2", "model.d_ff=64", "moe.d_ff=64", "model.vocab_size=512",
         "model.max_seq_len=32", "data.seq_len=32", "parallel.expert_parallel_size=1"]
LINES = ["ROMEO.\nBut soft! what light through yonder window breaks?",
         "JULIET.\nO Romeo, Romeo! wherefore art thou Romeo?"]


def resplit(src: Path, dst: Path, ep: int) -> None:
    """The checkpoint as ep ranks would have written it: experts_ep{i}.pt holding experts
    [i*E/ep, (i+1)*E/ep) with their first global id, and the topology in meta.json."""
    shutil.copytree(src, dst)
    whole = torch.load(src / "experts_ep000.pt", weights_only=True)
    os.remove(dst / "experts_ep000.pt")
    meta = json.loads((src / "meta.json").read_text())
    per = meta["topology"]["num_experts"] // ep
    files = meta["manifest"]["files"]
    del files["experts_ep000.pt"]
    for i in range(ep):
        files.update(manifest.write_listed(dst, f"experts_ep{i:03d}.pt", {
            "first_expert": i * per,
            "tensors": {n: t[i * per:(i + 1) * per].clone() for n, t in whole["tensors"].items()}}))
    meta["topology"].update(world_size=ep, ep_size=ep)
    meta["files"] = {p.name: p.stat().st_size for p in dst.iterdir() if p.name != "meta.json"}
    (dst / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-for-nothing tiny Switch model (8 experts), a tokenizer and a manifest
    naming it, saved at ep 1 and re-split as ep 2 and ep 4 would save it."""
    root = tmp_path_factory.mktemp("gen")
    prefix = str(root / "tok" / "sp")
    train_tokenizer((LINES * 30), prefix, vocab_size=300, num_threads=1)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"tokenizer": {"model": prefix + ".model"}, "add_bos": False}))
    cfg = load_config(ROOT / "configs" / "tiny_switch.yaml", SMALL + [f"data.manifest={manifest}"])
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe)
    with torch.no_grad():  # make the experts differ a lot, so a mix-up would show
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn_like(p))
    model.eval()
    state = TrainState(step=7, tokens_seen=7 * 256)
    ep1 = save_checkpoint(root / "ep1", model=model, optimizer=torch.optim.AdamW(model.parameters()),
                          state=state, topo=Topology(1, 1, cfg.moe.num_experts), rank=0,
                          config=config_to_dict(cfg), keep_last=2)
    paths = {1: ep1}
    for ep in (2, 4):
        paths[ep] = root / f"ep{ep}" / ep1.name
        resplit(ep1, paths[ep], ep)
    return model, cfg, paths, Tokenizer(prefix + ".model")


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_every_expert_loads_whatever_the_ep(saved, ep):
    model, cfg, paths, _ = saved
    loaded = load_for_inference(paths[ep])
    assert loaded.meta["topology"]["ep_size"] == ep and not loaded.model.training
    x = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(ep))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits_BSV, model(x).logits_BSV)


def test_a_run_directory_means_its_newest_checkpoint(saved):
    _, _, paths, _ = saved
    assert load_for_inference(paths[2].parent).path == paths[2]
    assert load_for_inference(paths[1]).meta["step"] == 7


def test_dropless_routes_every_token(saved):
    _, cfg, paths, _ = saved
    assert cfg.moe.eval_capacity_factor == 2.0
    assert load_for_inference(paths[1], dropless=True).cfg.moe.eval_capacity_factor is None


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    assert torch.allclose(filter_top_p(probs, 0.8), torch.tensor([0, 0.625, 0, 0.375]))
    assert torch.equal(filter_top_p(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # at least one
    assert torch.allclose(filter_top_p(probs, 0.81), torch.tensor([0, 0.5, 0.15, 0.3]) / 0.95)
    assert filter_top_p(probs, 1.0) is probs


def test_greedy_is_the_argmax_and_sampling_is_seeded(saved):
    model, _, paths, _ = saved
    loaded = load_for_inference(paths[2])
    context = [3, 40, 41]
    greedy = sample_tokens(loaded.model, context, 6, temperature=0)
    ids = list(context)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits_BSV[0, -1].argmax()))
    assert greedy == ids[3:]

    def draw(seed):
        return sample_tokens(loaded.model, context, 12, 1.0, 0.95, torch.Generator().manual_seed(seed))

    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_text_keeps_the_prompt_and_shows_eos_as_a_blank_line(saved):
    _, _, paths, tok = saved
    loaded = load_for_inference(paths[4])
    texts = generate_text(loaded, tok, "ROMEO.\n", 10, seed=3, num_samples=2)
    assert len(texts) == 2 and all(t.startswith("ROMEO.\n") for t in texts)
    a, b = tok.encode("But soft"), tok.encode("O Romeo")
    assert decode_with_breaks(tok, a + [tok.eos_id] + b) == "But soft\n\nO Romeo"
    assert unescape("ROMEO.\\n") == "ROMEO.\n"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moe_train", "generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_command_line(saved, tmp_path):
    _, _, paths, tok = saved
    proc = run_cli("--checkpoint", str(paths[2].parent), "--prompt", "JULIET.\\n", "--max-new-tokens", "5",
                   "--greedy", "--num-samples", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained at ep 2; 8 experts loaded, eval capacity factor 2.0; greedy" in proc.stdout
    samples = proc.stdout.split("--- sample ")[1:]
    assert len(samples) == 2 and samples[0] == samples[1].replace("2\n", "1\n", 1)  # greedy: same
    assert samples[0].startswith("1\nJULIET.\n")
    proc = run_cli("--checkpoint", str(tmp_path))
    assert proc.returncode == 3
    assert proc.stderr.strip() == f"moe-train generate: checkpoint error: no complete checkpoint under {tmp_path}"
    proc = run_cli("--checkpoint", str(paths[1]), "--tokenizer", str(tmp_path / "nope.model"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr
