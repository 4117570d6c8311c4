"""Hugging Face export and import (moe_train/hf/): transformers loads the export with no
custom code and computes our logits (fp32, 1e-4) and greedy tokens; the tokenizer encodes
text to our ids; import -> export reproduces every safetensors tensor bitwise; a model
imported from transformers and trained at ep 2 by ``train --resume`` continues from the
imported weights and exports again; an option without a counterpart is refused by name
(``--allow-inexact`` warns instead); a checkpoint that fails its manifest, or lacks an
expert-parallel rank's experts, is refused."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_fixtures import make_documents  # noqa: E402
from engine_harness import GlobalBatchLoader, make_cfg, run_train  # noqa: E402
from moe_train.checkpoint import TrainState, save_model_checkpoint  # noqa: E402
from moe_train.cli import main  # noqa: E402
from moe_train.config import config_from_dict, config_to_dict, load_config  # noqa: E402
from moe_train.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from moe_train.hf import mapping  # noqa: E402
from moe_train.hf.export import export_hf  # noqa: E402
from moe_train.hf.importer import import_hf  # noqa: E402
from moe_train.inference import load_for_inference, sample_tokens  # noqa: E402
from moe_train.model.transformer import MoETransformer  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

VOCAB = 384
SAMPLES = ["Hello world", "  two  spaces\tand a tab", "line one\nline two\n\n  indented", "naïve café 日本語 😀",
           "1234 numbers 3.14", "the model's router\n", " ", ""]
# qk_norm, GQA, rope, rmsnorm, swiglu, top-2 renormalised, dropless, a dense first block
MODERN = {"model": {"vocab_size": VOCAB, "d_model": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                    "d_ff": 48, "mlp_activation": "swiglu", "norm": "rmsnorm", "position": "rope",
                    "max_seq_len": 64, "qk_norm": True, "moe_every": 1, "first_dense_layers": 1,
                    "tie_embeddings": False},
          "moe": {"num_experts": 4, "top_k": 2, "d_ff": 16, "activation": "swiglu", "normalize_topk": True,
                  "capacity_factor": None, "eval_capacity_factor": None, "jitter_eps": 0.0}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A SentencePiece tokenizer like the data tools train, and a manifest naming it."""
    root = tmp_path_factory.mktemp("tok")
    prefix = str(root / "sp")
    train_tokenizer(make_documents(120, seed=3) + SAMPLES * 3, prefix, vocab_size=VOCAB, num_threads=1)
    manifests = {}
    for add_bos in (False, True):
        manifests[add_bos] = root / f"manifest_bos{int(add_bos)}.json"
        manifests[add_bos].write_text(json.dumps({"tokenizer": {"model": prefix + ".model"}, "add_bos": add_bos}))
    return Tokenizer(prefix + ".model"), manifests


def save_model(root: Path, raw: dict, manifest: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A model of ``raw`` with weights far from their init (routers sharp, norms not 1), saved."""
    cfg = config_from_dict({**raw, "data": {"seq_len": 32, "manifest": str(manifest)}})
    torch.manual_seed(seed)
    model = MoETransformer(cfg.model, cfg.moe).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or "w_gate" in name:
                p.normal_(0.0, 1.0)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    save_model_checkpoint(root, model, config_to_dict(cfg), TrainState(step=5), "test")
    return model, root


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def batch(seed: int, vocab: int = VOCAB, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours, theirs, x):
    with torch.no_grad():
        a, b = ours(x).logits_BSV, theirs(x).logits
    assert a.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def greedy_hf(model, context: list[int], n: int) -> list[int]:
    ids = torch.tensor([context])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(context):].tolist()


def tensors_equal(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.fixture(scope="module")
def modern(tmp_path_factory, tok):
    """The untrained modern-config model, saved and exported (Qwen3-MoE)."""
    root = tmp_path_factory.mktemp("modern")
    model, ckpt = save_model(root / "ckpt", MODERN, tok[1][False])
    report = export_hf(ckpt, root / "hf")
    return model, ckpt, root / "hf", report


def test_modern_model_is_qwen3_moe_with_our_logits_and_greedy_tokens(modern):
    model, _, out, report = modern
    config = json.loads((out / "config.json").read_text())
    assert report.plan.arch == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["mlp_only_layers"] == [0] and config["norm_topk_prob"] is True
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]  # safetensors only: no pickle anywhere
    hf = hf_model(out)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    assert_same_logits(model, hf, batch(1))
    context = [3, 17, 42, 99]
    assert greedy_hf(hf, context, 12) == sample_tokens(model, context, 12, temperature=0)


def test_tokenizer_encodes_like_ours(modern, tok, tmp_path):
    sp, manifests = tok
    hf = transformers.AutoTokenizer.from_pretrained(str(modern[2]))
    texts = SAMPLES + make_documents(40, seed=9) + ["<s> is text", "\r\n\u00a0\u200b", "x" * 30]
    for text in texts:
        assert hf(text)["input_ids"] == sp.encode(text), text
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    # shards made with --add-bos start each document with BOS: so does tokenizer(text)
    _, ckpt = save_model(tmp_path / "ckpt", MODERN, manifests[True])
    with_bos = transformers.AutoTokenizer.from_pretrained(str(export_hf(ckpt, tmp_path / "hf").out))
    assert with_bos("Hello world")["input_ids"] == [sp.bos_id] + sp.encode("Hello world")
    assert with_bos("Hello world", add_special_tokens=False)["input_ids"] == sp.encode("Hello world")


ARCH_CASES = {  # name: (expected architecture, model keys, moe keys) over MODERN
    # every block MoE, no qk norm: Mixtral (with a sliding window shorter than the batch)
    "mixtral": ("mixtral", {"qk_norm": False, "first_dense_layers": 0, "attention": "sliding_window",
                            "window": 5}, {}),
    # a gated shared expert, MoE every other block, tied head: Qwen2-MoE (zero q/k/v biases)
    "qwen2_moe": ("qwen2_moe", {"qk_norm": False, "moe_every": 2, "first_dense_layers": 0,
                                "tie_embeddings": True}, {"shared_d_ff": 24, "shared_gate": "sigmoid"}),
    # ungated shared expert, route_scale, top-1 not renormalised: Qwen2-MoE, weights rewritten
    "qwen2_moe_ungated": ("qwen2_moe", {"qk_norm": False},
                          {"shared_d_ff": 24, "shared_gate": "none", "route_scale": 2.5, "top_k": 1,
                           "normalize_topk": False}),
    # rotary scaling on Qwen3-MoE
    "qwen3_moe_yarn": ("qwen3_moe", {"rope_scaling": "yarn", "rope_scaling_factor": 4.0}, {}),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_architectures_match_and_round_trip_bitwise(case, tok, tmp_path):
    arch, model_keys, moe_keys = ARCH_CASES[case]
    raw = {"model": {**MODERN["model"], **model_keys}, "moe": {**MODERN["moe"], **moe_keys}}
    model, ckpt = save_model(tmp_path / "ckpt", raw, tok[1][False], seed=1)
    report = export_hf(ckpt, tmp_path / "hf", with_tokenizer=False)
    assert report.plan.arch == arch
    hf = hf_model(tmp_path / "hf")
    assert_same_logits(model, hf, batch(2))
    back = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert_same_logits(load_for_inference(back.checkpoint).model, hf, batch(3))
    export_hf(back.checkpoint, tmp_path / "again", with_tokenizer=False)
    tensors_equal(tmp_path / "hf", tmp_path / "again")


def test_a_transformers_made_model_imports_and_round_trips_in_bf16(tmp_path, capsys):
    config = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        mlp_only_layers=[0], norm_topk_prob=False, max_position_embeddings=128, rope_theta=5000.0)
    torch.manual_seed(0)
    theirs = transformers.Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    theirs.save_pretrained(str(tmp_path / "hf"))
    # the training sections come from --config (its model-defining keys are replaced), and
    # --set may not change what config.json fixes
    (tmp_path / "train.yaml").write_text("data: {manifest: shards/manifest.json, seq_len: 64}\n"
                                         "optim: {lr: 0.003}\nmodel: {d_model: 999, dropout: 0.1}\n")
    args = ["import", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours"),
            "--config", str(tmp_path / "train.yaml")]
    assert main(args + ["--set", "moe.top_k=1"]) == 2 and "moe.top_k" in capsys.readouterr().err
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "imported Qwen3-MoE" in printed and "model.d_model replaced" in printed
    cfg = load_config(tmp_path / "ours" / "config.yaml")
    assert (cfg.data.manifest, cfg.optim.lr, cfg.model.dropout) == ("shards/manifest.json", 0.003, 0.1)
    assert cfg.model.d_model == 32 and cfg.model.qk_norm and cfg.model.first_dense_layers == 1
    assert cfg.moe.normalize_topk is False and cfg.model.rope_theta == 5000.0
    assert Path(cfg.checkpoint.dir) == (tmp_path / "ours").resolve()
    ours = load_for_inference(tmp_path / "ours").model
    assert_same_logits(ours, hf_model(tmp_path / "hf"), batch(4, vocab=96))
    export_hf(tmp_path / "ours", tmp_path / "back", dtype="bfloat16", with_tokenizer=False)
    tensors_equal(tmp_path / "hf", tmp_path / "back")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, modern, tok):
    """The modern model's export imported, then trained 3 steps at world 2, ep 2 by
    ``train --resume auto`` from the imported checkpoint, and exported again."""
    root = tmp_path_factory.mktemp("trained")
    imported = import_hf(modern[2], root / "run")
    model_keys = {k: v for k, v in config_to_dict(imported.cfg)["model"].items()}
    moe_keys = {**config_to_dict(imported.cfg)["moe"], "capacity_factor": None, "jitter_eps": 0.0}
    cfg = make_cfg(root, model=model_keys, moe=moe_keys, parallel={"expert_parallel_size": 2},
                   train={"max_steps": 3}, checkpoint={"dir": str(root / "run")},
                   data={"manifest": str(tok[1][False])})
    results = run_train(cfg, world=2, resume="auto")
    step3 = root / "run" / "step_00000003"
    report = export_hf(step3, root / "hf", check=True)
    return imported, cfg, results, step3, report


def test_import_then_export_is_bitwise(modern, trained, tmp_path):
    imported = trained[0]
    assert json.loads((imported.checkpoint / "meta.json").read_text())["weights_only"]
    export_hf(imported.checkpoint, tmp_path / "again")
    tensors_equal(modern[2], tmp_path / "again")


def test_train_resume_continues_from_the_imported_weights(modern, trained):
    _, cfg, results, step3, _ = trained
    # step 1 ran on the imported weights: its loss is the transformers model's on that batch
    tokens = GlobalBatchLoader(0, 1, cfg.data.micro_batch_size * 2, 1, cfg.data.seq_len, VOCAB)._global_batch(0)
    with torch.no_grad():
        logits = hf_model(modern[2])(tokens[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert results[0].losses[1] == pytest.approx(expected, rel=1e-5)
    assert results[0].final_step == 3


def test_ep2_trained_model_exports_with_every_expert(trained):
    _, cfg, _, step3, report = trained
    meta = json.loads((step3 / "meta.json").read_text())
    assert meta["topology"]["ep_size"] == 2 and (step3 / "experts_ep001.pt").is_file()
    ours = load_for_inference(step3).model
    hf = hf_model(report.out)
    assert_same_logits(ours, hf, batch(5))
    context = [3, 5, 6, 7, 8]
    assert greedy_hf(hf, context, 10) == sample_tokens(ours, context, 10, temperature=0)
    assert report.check["max_abs_diff"] < 1e-4 and report.check["greedy_equal"]  # export --check
    assert "greedy 16 tokens equal" in "\n".join(report.lines())


def copy_checkpoint(src: Path, root: Path) -> Path:
    dst = root / src.name
    shutil.copytree(src, dst)
    return dst


def test_a_checkpoint_that_fails_its_manifest_or_lacks_experts_is_refused(trained, tmp_path, capsys):
    step3 = trained[3]
    flipped = copy_checkpoint(step3, tmp_path / "flip")
    data = bytearray((flipped / "experts_ep001.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "experts_ep001.pt").write_bytes(bytes(data))
    assert main(["export", "--checkpoint", str(flipped), "--out", str(tmp_path / "o1")]) == 3
    assert "experts_ep001.pt" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    # a writer that never wrote rank 1's experts (file and manifest entry both absent)
    lacking = copy_checkpoint(step3, tmp_path / "lack")
    (lacking / "experts_ep001.pt").unlink()
    meta = json.loads((lacking / "meta.json").read_text())
    del meta["files"]["experts_ep001.pt"], meta["manifest"]["files"]["experts_ep001.pt"]
    (lacking / "meta.json").write_text(json.dumps(meta))
    assert main(["export", "--checkpoint", str(lacking), "--out", str(tmp_path / "o2")]) == 3
    assert "experts_ep001.pt is missing" in capsys.readouterr().err


def test_options_without_a_counterpart_are_refused_by_name(tmp_path, tok, capsys):
    def refusals(**changes) -> str:
        raw = {"model": {**MODERN["model"], **changes.get("model", {})},
               "moe": {**MODERN["moe"], **changes.get("moe", {})}}
        cfg = config_from_dict({**raw, "data": {"seq_len": 32}})
        plan = mapping.plan_export(cfg.model, cfg.moe)
        return " ".join(plan.impossible + plan.inexact)

    assert "model.norm = 'layernorm'" in refusals(model={"norm": "layernorm"})
    assert "model.position = 'learned'" in refusals(model={"position": "learned"})
    assert "moe.activation = 'gelu'" in refusals(moe={"activation": "gelu"})
    assert "model.embed_dim = 16" in refusals(model={"embed_dim": 16})
    assert "moe.num_groups = 2" in refusals(moe={"num_groups": 2})
    assert "Qwen3-MoE has no shared expert" in refusals(moe={"shared_d_ff": 8, "shared_gate": "sigmoid"})
    with pytest.MonkeyPatch.context() as mp:  # an option added later, without a mapping
        mp.setattr(mapping, "MODEL_MAPPED", mapping.MODEL_MAPPED - {"global_tokens"})
        assert "model.global_tokens = 3: the Hugging Face export has no mapping" in refusals(
            model={"attention": "longformer", "global_tokens": 3})
    # capacity dropping at inference: refused naming the option, or exported with a warning
    _, ckpt = save_model(tmp_path / "ckpt", {**MODERN, "moe": {**MODERN["moe"], "eval_capacity_factor": 2.0}},
                         tok[1][False])
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "moe.eval_capacity_factor = 2.0" in err and "--allow-inexact" in err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "inexact"), "--allow-inexact",
                 "--no-tokenizer"]) == 0
    assert "WARNING: inexact (--allow-inexact): moe.eval_capacity_factor = 2.0" in capsys.readouterr().out
    assert (tmp_path / "inexact" / "model.safetensors").is_file() and not (tmp_path / "refused").exists()
