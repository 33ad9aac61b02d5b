"""tandem.zoo end to end on a CPU: train the micro preset through the real command path,
then check what users rely on -- the folders load with plain Auto classes, share one
exactly-round-tripping tokenizer, the splits are disjoint, and the report has the metrics.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem import zoo

STEPS = 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Run `tandem zoo --preset micro` once for the whole module (the slow part, ~15 s)."""
    out = tmp_path_factory.mktemp("zoo")
    rc = zoo.main(["--preset", "micro", "--out", str(out), "--device", "cpu",
                   "--steps", str(STEPS), "--corpus-mb", "0.2", "--eval-prompts", "4",
                   "--gen-tokens", "8"])
    assert rc == 0
    return out


def test_folders_load_with_plain_auto_classes(built):
    for name in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(built / name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(built / name)
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.tie_word_embeddings
        assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()
        assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
        assert tok.eos_token_id == model.config.eos_token_id == 0
        ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids  # [1, P]
        logits = model(input_ids=ids).logits  # [1, P, V]
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
        assert torch.isfinite(logits).all()


def test_weights_stored_in_bf16_and_small(built):
    from safetensors import safe_open

    for name in ("target", "draft"):
        with safe_open(str(built / name / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16"}
    assert sum(p.stat().st_size for p in built.rglob("*") if p.is_file()) < 1_000_000


def test_pair_shares_vocab_and_sizes_differ(built):
    t_tok = AutoTokenizer.from_pretrained(built / "target")
    d_tok = AutoTokenizer.from_pretrained(built / "draft")
    assert t_tok.get_vocab() == d_tok.get_vocab()
    t_cfg = AutoModelForCausalLM.from_pretrained(built / "target").config
    d_cfg = AutoModelForCausalLM.from_pretrained(built / "draft").config
    assert t_cfg.vocab_size == d_cfg.vocab_size == zoo.presets()["micro"].vocab_size
    assert len(t_tok) <= t_cfg.vocab_size
    assert (d_cfg.hidden_size, t_cfg.hidden_size) == (16, 32)


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x  # tab\n",
    "  leading and trailing spaces  \r\n\n\n",
    "ünïcödé → 日本語 😀 \u00a0nbsp \u200bzero-width",
    "<|endoftext|> literal special and <|end",
    "",
    " ",
    "\x00\x01 control bytes \x7f",
])
def test_tokenizer_round_trips_exactly_and_adds_nothing(built, text):
    tok = AutoTokenizer.from_pretrained(built / "target")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # no BOS/EOS added: HF encode equals the raw BPE encoding
    assert ids == tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_splits_disjoint_nonempty_and_deterministic():
    train, heldout = zoo.corpus_files("train"), zoo.corpus_files("heldout")
    assert train and heldout
    assert not set(train) & set(heldout)
    assert train == sorted(train) and heldout == sorted(heldout)
    root = zoo.stdlib_root()
    for path in heldout[:50]:
        assert zlib.crc32(path.relative_to(root).as_posix().encode()) % 10 == 0
    assert all("site-packages" not in p.parts for p in train + heldout)
    # ~10% held out (crc32 is roughly uniform)
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.15


def test_heldout_prompts_come_from_heldout_files():
    prompts = zoo.heldout_prompts(5, seed=1)
    assert len(prompts) == 5 and prompts == zoo.heldout_prompts(5, seed=1)
    heldout_text = "\n".join(p.read_text(encoding="utf-8") for p in zoo.corpus_files("heldout"))
    for prompt in prompts:
        assert prompt.lstrip().startswith(("def ", "class ", "async def "))
        assert prompt.count("\n") <= 11 and not prompt.endswith("\n")
        assert prompt in heldout_text


def test_corpus_cap_is_respected():
    docs = zoo.load_documents("train", max_mb=0.05)
    assert 0 < sum(len(d.encode()) for d in docs) <= 60_000


def test_report_has_metrics(built):
    report = json.loads((built / "zoo_report.json").read_text())
    m = report["metrics"]
    # even 20 micro steps beat a uniform guess over the vocab (ln 300 = 5.70) on held-out code
    assert 0 < m["target_heldout_ce"] < math.log(300) - 0.5
    assert 0 < m["draft_heldout_ce"] < math.log(300)
    for key in ("teacher_forced_agreement", "generation_acceptance"):
        assert 0.0 <= m[key] <= 1.0
    assert m["generation_positions"] == 4 * 8
    assert set(m["spec_tokens_per_target_call"]) == {"k=2", "k=4", "k=8"}
    assert report["training"]["target"]["steps"] == STEPS
    assert report["training"]["draft"]["steps"] == STEPS
    assert report["corpus"]["train_tokens"] > 0 and report["corpus"]["heldout_tokens"] > 0
    assert report["device"].startswith("cpu")


def test_training_reduces_loss():
    """A few steps on a fixed batch must lower the loss: catches a broken optimizer/LR path."""
    preset = zoo.presets()["micro"]
    model = zoo.build_model(preset.target, preset, seed=0)
    ids = torch.randint(0, preset.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    plan = zoo.PhasePlan(lr=3e-3, warmup=1, batch=4, seq_len=32, seed=0, steps=1)
    opt = zoo.make_optimizer(model, plan.lr, torch.device("cpu"))
    batch = zoo.sample_windows(ids, 4, 32, torch.Generator().manual_seed(0))  # [4, 33]
    first = zoo.lm_loss(model, batch).item()
    for _ in range(30):
        zoo.train_step(model, opt, zoo.lm_loss, batch, 3e-3, torch.device("cpu"))
    assert zoo.lm_loss(model, batch).item() < first - 0.5


def test_training_is_reproducible_for_a_seed():
    preset = zoo.presets()["micro"]
    ids = torch.randint(0, preset.vocab_size, (4096,), generator=torch.Generator().manual_seed(0))
    plan = zoo.PhasePlan(lr=3e-3, warmup=2, batch=4, seq_len=32, seed=7, steps=5)

    def trained(seed: int) -> dict:
        model = zoo.build_model(preset.target, preset, seed=seed)
        zoo.train_phase(model, zoo.lm_loss, ids, plan, torch.device("cpu"), "test")
        return model.state_dict()

    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_distill_loss_is_zero_for_identical_models():
    preset = zoo.presets()["micro"]
    model = zoo.build_model(preset.target, preset, seed=0).eval()
    batch = torch.randint(0, preset.vocab_size, (2, 17))
    assert zoo.distill_loss(model, batch, teacher=model).item() == pytest.approx(0.0, abs=1e-5)
    other = zoo.build_model(preset.target, preset, seed=1).eval()
    assert zoo.distill_loss(other, batch, teacher=model).item() > 1e-4


def test_spec_tokens_per_call():
    assert zoo.spec_tokens_per_call([False] * 6, k=4) == 1.0
    assert zoo.spec_tokens_per_call([True] * 10, k=4) == 5.0  # 4 accepted + 1 from the target
    assert zoo.spec_tokens_per_call([True, False, True, True], k=4) == pytest.approx(4 / 2)


def test_lr_schedule_warms_up_then_decays():
    lrs = [zoo.lr_at(s, warmup=10, total=100, peak=1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def _args(*argv: str):
    parser = zoo.argparse.ArgumentParser()
    zoo.add_arguments(parser)
    return parser.parse_args(["--out", "unused", *argv])


def test_time_budget_caps_target_epochs_and_steps_are_literal():
    preset = zoo.presets()["tiny"]
    tokens_per_step = preset.batch_size * preset.seq_len
    target, draft = zoo.phase_plans(_args("--minutes", "4"), preset, train_tokens=100 * tokens_per_step)
    assert target.seconds == pytest.approx(240 * 0.6) and draft.seconds == pytest.approx(240 * 0.4)
    assert target.max_steps == int(preset.max_epochs * 100) and draft.max_steps is None
    target, draft = zoo.phase_plans(_args("--steps", "600", "--draft-steps", "5000"), preset, 10**9)
    assert (target.steps, draft.steps, target.max_steps) == (600, 5000, None)
    assert (target.warmup, draft.warmup) == (60, preset.warmup_steps)


def test_bench_preset_sizes():
    """Counted on the meta device: no memory, no time."""
    preset = zoo.presets()["bench"]
    with torch.device("meta"):
        target = zoo.build_model(preset.target, preset, seed=0)
        draft = zoo.build_model(preset.draft, preset, seed=0)
    assert zoo.n_params(target) >= 1_000_000_000
    assert 60_000_000 <= zoo.n_params(draft) <= 100_000_000
