"""Hugging Face GPT-2 folders in: a folder `transformers` saved (random weights, tokenizer as vocab.json +
merges.txt) loads as --model / --init with transformers' logits and greedy tokens, exports back with the
same config, fine-tunes and runs reinforce; what our GPT does not implement is a one-line refusal."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from genpt_dist.checkpoint import load_model, resolve
from genpt_dist.errors import UserError
from genpt_dist.model.sampling import sample

transformers = pytest.importorskip("transformers")
EOT = "<|endoftext|>"


def save_gpt2(folder: Path, text: str, *, safetensors: bool = True, **config) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE trained on `text`, saved as transformers saves one; the
    tokenizer is vocab.json + merges.txt only (GPT-2's own files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([text], trainer=trainer)
    tok.model.save(str(folder))  # vocab.json, merges.txt
    eot = tok.token_to_id(EOT)
    settings = dict(n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=eot, eos_token_id=eot)
    settings.update(config)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.get_vocab_size(), **settings))
    model.save_pretrained(str(folder))
    if not safetensors:  # the pickle older transformers versions wrote (5.x writes safetensors only)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture(scope="module")
def text(shakespeare) -> str:
    return shakespeare.read_text()[:100_000]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, text) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("hf") / "gpt2", text)


def _ids(folder: Path, prompt: str) -> list[int]:
    """<|endoftext|> + the prompt, tokenised by transformers from the folder's vocab.json + merges.txt."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = [tok.convert_tokens_to_ids(EOT), *tok(prompt, add_special_tokens=False)["input_ids"]]
    assert len(ids) > 5, ids
    return ids


@pytest.mark.parametrize(
    "config",
    [{}, {"activation_function": "gelu", "layer_norm_epsilon": 1e-3}, {"activation_function": "relu"}],
    ids=["gelu_new", "gelu-eps", "relu"],
)
def test_logits_equal_transformers_on_the_same_ids(tmp_path, text, config):
    folder = save_gpt2(tmp_path / "m", text, **config)
    ours, tok, ref = load_model(str(folder))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    ids = torch.tensor([_ids(folder, "ROMEO: what light through yonder window breaks?")])
    assert ours.config.activation == config.get("activation_function", "gelu_new")
    assert ours.config.layer_norm_eps == config.get("layer_norm_epsilon", 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], theirs(ids).logits, atol=1e-4, rtol=0)
    assert tok.bos_id == tok.eos_id == tok.pad_id == ids[0, 0].item() and tok.shared_specials
    assert ref.is_export and ref.meta.weights == "model.safetensors"


def test_greedy_tokens_and_the_tokenizer_equal_transformers(gpt2):
    ours, tok, _ = load_model(str(gpt2))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2)).eval()
    prompt = "First Citizen:\nBefore we proceed"
    ids = _ids(gpt2, prompt)
    assert [tok.bos_id, *tok.encode(prompt)] == ids  # vocab.json + merges.txt read as transformers reads them
    out = sample(ours, [ids], max_new_tokens=24, top_k=1, eos_id=tok.eos_id, pad_id=tok.pad_id)
    mine = out.tokens[0, out.prompt_width : out.prompt_width + int(out.new_lengths[0])].tolist()
    with torch.no_grad():
        ref = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_id)
    assert mine == ref[0, len(ids) :].tolist()


def test_pytorch_model_bin_loads_with_weights_only(tmp_path, text):
    folder = save_gpt2(tmp_path / "bin", text, safetensors=False)
    assert (folder / "pytorch_model.bin").exists() and not (folder / "model.safetensors").exists()
    ours, _, _ = load_model(str(folder))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    ids = torch.tensor([_ids(folder, "To be, or not to be")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], theirs(ids).logits, atol=1e-4, rtol=0)


def test_the_export_of_an_imported_model_loads_back_with_the_same_config(gpt2, tmp_path):
    from genpt_dist.export import export

    out = tmp_path / "export"
    export(str(gpt2), str(out), "hf")
    before, after = (json.loads((p / "config.json").read_text()) for p in (gpt2, out))
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function", "layer_norm_epsilon")
    for key in keys:
        assert after[key] == before[key], key
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.bos_token == hf_tok.eos_token == EOT
    ids = torch.tensor([_ids(gpt2, "KING RICHARD III:")])
    with torch.no_grad():
        original = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2)).eval()(ids).logits
        torch.testing.assert_close(theirs(ids).logits, original, atol=1e-5, rtol=0)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_a_model_trained_with_another_activation_exports_it(tmp_path, activation):
    from helpers import random_export

    folder = random_export(tmp_path / "m", "hf", activation=activation)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["activation_function"] == activation
    ours, _, _ = load_model(folder)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], theirs(ids).logits, atol=1e-4, rtol=0)
    assert ours.config.activation == activation


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran at load time",))


@pytest.mark.parametrize("case", ["model-type", "classifier", "option", "activation", "no-weights", "pickle", "vocab"])
def test_refusals_are_one_line_naming_the_problem(tmp_path, text, case):
    folder = save_gpt2(tmp_path / case, text)
    config = json.loads((folder / "config.json").read_text())
    expect = {
        "model-type": "model_type 'llama'",
        "classifier": "a GPT2ForSequenceClassification, not a GPT-2 language model",
        "option": "scale_attn_by_inverse_layer_idx=True",
        "activation": "activation_function='silu'",
        "no-weights": "no weights file",
        "pickle": "weights_only",
        "vocab": f"the tokenizer has {config['vocab_size']} tokens, the model's embedding only 300",
    }[case]
    if case == "model-type":
        config["model_type"] = "llama"
    elif case == "classifier":
        config["architectures"] = ["GPT2ForSequenceClassification"]
    elif case == "option":
        config["scale_attn_by_inverse_layer_idx"] = True
    elif case == "activation":
        config["activation_function"] = "silu"
    elif case == "vocab":
        config["vocab_size"] = 300
    elif case == "no-weights":
        (folder / "model.safetensors").unlink()
    elif case == "pickle":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode()}))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert expect in message and "\n" not in message, message


def test_a_folder_of_ours_still_resolves_as_before(gpt2):
    assert resolve(str(gpt2)).meta.export_format == "transformers"
    with pytest.raises(UserError, match="no checkpoint"):
        resolve(str(gpt2.parent / "nothing"))


@pytest.mark.slow
def test_finetune_then_reinforce_from_a_gpt2_folder(ray_session, gpt2, tmp_path):
    """The folder is --init of finetune and of reinforce, and the fine-tuned model exports back to transformers."""
    from genpt_dist.config import load_config
    from genpt_dist.export import export
    from genpt_dist.rl.driver import reinforce
    from genpt_dist.train.finetune import finetune

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    task = tmp_path / "task.jsonl"
    pairs = [("ROMEO:", " O, she doth teach the torches"), ("JULIET:", " Ay me!"), ("NURSE:", " Madam!")] * 8
    task.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    cfg = load_config(tiny, ["finetune.train.steps=4", "finetune.train.eval_every=2", "finetune.patience=0"])
    out = finetune(str(task), str(gpt2), str(tmp_path / "ft"), cfg)
    assert out["step"] == 4 and out["checkpoint"]
    export(str(tmp_path / "ft"), str(tmp_path / "ft-hf"), "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ft-hf"))
    assert theirs.config.n_positions == 64 and theirs.config.vocab_size == resolve(str(gpt2)).model_config.vocab_size

    reward = tmp_path / "reward.py"
    reward.write_text("def length(prompts, completions, **kw):\n    return [len(c) / 16 for c in completions]\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in pairs))
    rl = reinforce(
        str(gpt2),
        str(tmp_path / "rl"),
        load_config(tiny, ["reinforce.train.steps=2", "reinforce.train.checkpoint_every=2"]),
        prompts=str(prompts),
        rewards=[f"python:{reward}:length"],
    )
    assert rl["step"] == 2 and rl["rewards"] == ["length"]


def test_prepare_reuses_a_given_tokenizer_and_refuses_what_is_none(gpt2, tmp_path, text):
    from genpt_dist.checkpoint import load_tokenizer
    from genpt_dist.config import load_config
    from genpt_dist.data.manifest import load_manifest
    from genpt_dist.data.prepare import prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[:50_000])
    data = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").data
    out = prepare([str(corpus)], str(tmp_path / "data"), data, tokenizer=str(gpt2))
    manifest = load_manifest(out["output"])
    tok = load_tokenizer(resolve(str(gpt2)))
    assert manifest.tokenizer.sha256 == tok.sha256 and manifest.tokenizer.kind == "given"
    assert manifest.tokenizer.source == str(gpt2) and out["vocab_size"] == tok.vocab_size
    assert manifest.load_tokenizer().encode("ROMEO: hi") == tok.encode("ROMEO: hi")
    with pytest.raises(UserError, match="different dataset"):  # the same corpus under another tokenizer
        prepare([str(corpus)], str(tmp_path / "data"), data)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing.json"):
        with pytest.raises(UserError, match="--tokenizer") as err:
            prepare([str(corpus)], str(tmp_path / "other"), data, tokenizer=str(bad))
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_continued_pretraining_of_a_gpt2_on_data_prepared_with_its_tokenizer(ray_session, gpt2, tmp_path, text):
    from genpt_dist.config import load_config
    from genpt_dist.data.prepare import prepare
    from genpt_dist.train.pretrain import pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[:50_000])
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"])
    data = prepare([str(corpus)], str(tmp_path / "data"), cfg.data, tokenizer=str(gpt2))["output"]
    out = pretrain(data, str(tmp_path / "run"), cfg, init=str(gpt2))
    assert out["step"] == 2 and out["val_loss"] is not None
    meta = resolve(str(tmp_path / "run")).meta
    assert meta.model == resolve(str(gpt2)).model_config  # the shape is the init's, not the recipe's
