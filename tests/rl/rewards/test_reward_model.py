"""`model:` rewards (`rl.rewards.reward_model`): a Hugging Face sequence classifier (random weights) scores as
TRL does."""

from __future__ import annotations

import pytest
import torch
from helpers import save_classifier

from genpt_dist.errors import UserError
from genpt_dist.rl.rewards.reward_model import HFRewardModel, check_reward_model

transformers = pytest.importorskip("transformers")


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
