"""The memory's novelty references (the reference of `novelty`) are a sample of the final model's context summaries
of the training data, taken in eval mode when training ends."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch
from test_training import args, bank, dataset, make

from peft_umema import UMEMAConfig
from peft_umema.training.trainer import UMEMATrainer


def eval_summaries(model, batches) -> torch.Tensor:
    tuner = model.base_model
    model.eval()
    summaries = []
    with torch.no_grad(), tuner.recording_calls() as calls:
        for batch in batches:
            model(**{key: value for key, value in batch.items() if key != "labels"})
            summaries.append(calls[-1].summary)
    return torch.cat(summaries).float()


def nearest_cosine(rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return (F.normalize(rows, dim=-1) @ F.normalize(candidates, dim=-1).T).amax(-1)


def train_a_little(model, batches) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.base_model.commit_memory()


@pytest.mark.parametrize("family,task", [("gpt2", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("llama", "SEQ_CLS")])
def test_refresh_keeps_the_final_models_summaries(family, task):
    model = make(task, family)
    batches = [tiny_batch(task=task, seed=seed) for seed in range(3)]
    assert float(bank(model).novelty(torch.randn(4, bank(model).dim)).abs().max()) == 0  # no reference yet
    train_a_little(model, batches)
    summaries = eval_summaries(model, batches)
    model.train()
    assert model.base_model.refresh_novelty_references(batches) == len(summaries)
    assert model.training  # the mode it was in
    refreshed = bank(model)
    assert int(refreshed.reference_count) == len(summaries)
    references = refreshed.references[: len(summaries)]
    torch.testing.assert_close(references.norm(dim=-1), torch.ones(len(summaries)))
    # every training example is its own nearest reference: novelty 0; other inputs are novel
    torch.testing.assert_close(nearest_cosine(summaries, references), torch.ones(len(summaries)))
    assert float(refreshed.novelty(summaries).abs().max()) < 1e-5
    assert float(refreshed.novelty(torch.randn_like(summaries)).min()) > 0.05


def test_a_bank_smaller_than_the_data_keeps_a_seeded_uniform_sample():
    model = make("SEQ_CLS", novelty_references=5)
    batches = [tiny_batch(task="SEQ_CLS", seed=seed) for seed in range(4)]
    summaries = eval_summaries(model, batches)
    assert model.base_model.refresh_novelty_references(batches, seed=1) == len(summaries) > 5
    first = bank(model).references.clone()
    assert int(bank(model).reference_count) == 5
    torch.testing.assert_close(nearest_cosine(first, summaries), torch.ones(5))  # each row is one example
    model.base_model.refresh_novelty_references(batches, seed=1)
    torch.testing.assert_close(bank(model).references, first)  # same seed, same sample
    model.base_model.refresh_novelty_references(batches, seed=2)
    assert not torch.allclose(bank(model).references, first)


def test_zero_references_turn_the_novelty_off():
    model = make("SEQ_CLS", novelty_references=0)
    batch = tiny_batch(task="SEQ_CLS")
    assert model.base_model.refresh_novelty_references([batch]) == 0
    model.eval()
    with torch.no_grad():
        output = model(**{key: value for key, value in batch.items() if key != "labels"})
    assert torch.isfinite(output.epistemic).all()
    assert float(bank(model).novelty(torch.randn(3, bank(model).dim)).abs().max()) == 0


@pytest.mark.parametrize("value", [-1, True, 2.5, "512"])
def test_bad_reference_counts_are_refused(value):
    with pytest.raises(ValueError, match="novelty_references"):
        UMEMAConfig(task_type="SEQ_CLS", novelty_references=value)


def test_training_with_the_trainer_ends_with_the_final_models_references(tmp_path):
    model = make("SEQ_CLS")
    data = dataset("SEQ_CLS")
    trainer = UMEMATrainer(model=model, args=args(tmp_path, num_train_epochs=2), train_dataset=data)
    trainer.train()
    assert int(bank(model).reference_count) == len(data)  # each example once, not once per epoch and step
    summaries = eval_summaries(model, trainer.get_train_dataloader())
    torch.testing.assert_close(nearest_cosine(bank(model).references[: len(data)], summaries),
                               torch.ones(len(data)))
