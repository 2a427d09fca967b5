"""The memory's query statistics (the reference of `novelty`) describe the final model, not the training path."""

import pytest
import torch
from conftest import tiny_batch
from test_training import args, bank, dataset, make

from peft_umema.training.trainer import UMEMATrainer


def eval_queries(model, batches) -> torch.Tensor:
    tuner = model.base_model
    model.eval()
    queries = []
    with torch.no_grad(), tuner.recording_calls() as calls:
        for batch in batches:
            model(**{key: value for key, value in batch.items() if key != "labels"})
            queries.append(calls[-1].query)
    return torch.cat(queries).double()


@pytest.mark.parametrize("family,task", [("gpt2", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("llama", "SEQ_CLS")])
def test_refresh_replaces_the_training_statistics_by_the_final_models(family, task):
    model = make(task, family)
    batches = [tiny_batch(task=task, seed=seed) for seed in range(3)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for batch in batches:  # the query projection moves while the statistics accumulate
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.base_model.commit_memory()
    queries = eval_queries(model, batches)
    stale = bank(model).query_sum.clone()
    model.train()
    assert model.base_model.refresh_query_statistics(batches) == len(queries)
    assert model.training  # the mode it was in
    refreshed = bank(model)
    assert not torch.allclose(stale, refreshed.query_sum)
    torch.testing.assert_close(refreshed.query_sum.double(), queries.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(refreshed.query_sq_sum.double(), (queries**2).sum(0), rtol=1e-5, atol=1e-5)
    # the training queries of the final model now look typical: |log mean z^2| near 0 on average
    assert float(refreshed.novelty(queries.float()).mean()) < float(refreshed.novelty(3 * queries.float()).mean())


def test_training_with_the_trainer_ends_with_the_final_models_statistics(tmp_path):
    model = make("SEQ_CLS")
    data = dataset("SEQ_CLS")
    trainer = UMEMATrainer(model=model, args=args(tmp_path, num_train_epochs=2), train_dataset=data)
    trainer.train()
    trained = bank(model).query_sum.clone()
    model.base_model.refresh_query_statistics(trainer.get_train_dataloader())
    torch.testing.assert_close(trained, bank(model).query_sum)
    assert int(bank(model).query_count) == len(data)  # each example once, not once per epoch and step
