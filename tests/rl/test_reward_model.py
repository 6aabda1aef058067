"""`model:` rewards: a Hugging Face sequence classifier (random weights, made here) scores as TRL does."""

from __future__ import annotations

import pytest
import torch

from genpt_dist.errors import UserError
from genpt_dist.rl.reward_model import HFRewardModel, check_reward_model
from genpt_dist.tokenizer import byte_tokenizer

transformers = pytest.importorskip("transformers")


def save_classifier(folder, lm_head: bool = False) -> str:
    """A 1-layer GPT-2 sequence classifier (or LM) and a tokenizer made from our byte tokenizer."""
    tok = byte_tokenizer()
    path = folder / "tokenizer.json"
    path.write_text(tok.to_json())
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", eos_token="<eos>")
    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=tok.pad_id,
    )
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2ForSequenceClassification
    cls(config).save_pretrained(str(folder))
    hf_tok.save_pretrained(str(folder))
    return str(folder)


def test_scores_are_the_first_logit_of_prompt_plus_completion(tmp_path):
    folder = save_classifier(tmp_path)
    check_reward_model(folder)
    scores = HFRewardModel(folder, batch_size=2).score(["ab", "c", "hello "], ["cd", "", "world"])
    model = transformers.GPT2ForSequenceClassification.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        for text, score in zip(["abcd", "c", "hello world"], scores):
            expect = model(**tok([text], return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
            assert score == pytest.approx(expect, abs=1e-4), text  # right padding changes nothing


def test_a_folder_that_is_not_a_sequence_classifier_is_refused(tmp_path):
    (tmp_path / "lm").mkdir()
    with pytest.raises(UserError, match=r"not a sequence classifier \(architectures: GPT2LMHeadModel\)"):
        check_reward_model(save_classifier(tmp_path / "lm", lm_head=True))
    with pytest.raises(UserError, match="no config.json there"):
        check_reward_model(str(tmp_path / "nothing"))
