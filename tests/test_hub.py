"""`push_to_hub` against a local stand-in for the hub: what is pushed, pulled back, reproduces the pushed outputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model
from datasets import Dataset
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_cli import save_ner_slice, save_tiny_backbone
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    TrainingArguments,
)

from peft_umema import UMEMAConfig
from peft_umema.evaluation.metrics import classification_metrics
from peft_umema.experiments import runs as run
from peft_umema.hub import push_to_hub
from peft_umema.training.trainer import UMEMATrainer

ENDPOINT = "http://127.0.0.1:9"  # nothing listens there: any real network call would fail
TOKEN = "hf_local_test_token"
AUTO_CLASSES = {"SEQ_CLS": AutoModelForSequenceClassification, "TOKEN_CLS": AutoModelForTokenClassification}


class LocalHub:
    """Stands in for the hub: repositories are folders; records which endpoint and token each call used."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.calls.append(("create_repo", api.endpoint, api.token))
            folder = hub.root / repo_id
            if folder.exists() and not exist_ok:
                raise FileExistsError(repo_id)
            folder.mkdir(parents=True, exist_ok=True)
            return f"{api.endpoint}/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, **kwargs):
            hub.calls.append(("upload_folder", api.endpoint, api.token))
            if not (hub.root / repo_id).is_dir():
                raise FileNotFoundError(f"repository {repo_id} does not exist")
            shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)
            return f"{api.endpoint}/{repo_id}/commit/{commit_message}"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self

    def pull(self, repo_id: str, destination: Path) -> Path:
        """What `snapshot_download` gives: a fresh copy of the repository's files."""
        return Path(shutil.copytree(self.root / repo_id, destination))


@pytest.fixture
def hub(tmp_path, monkeypatch) -> LocalHub:
    return LocalHub(tmp_path / "hub").install(monkeypatch)


def rows(task, batches=3, seed=0):
    data = []
    for b in range(batches):
        batch = tiny_batch(task=task, seed=seed + b)
        data += [{k: v[i].tolist() for k, v in batch.items()} for i in range(len(batch["labels"]))]
    return Dataset.from_list(data)


def tiny_base(task: str, folder: Path):
    """A tiny BERT loaded from a folder, as a real base model is, so that the adapter config names it."""
    if not folder.is_dir():
        tiny_model("bert", task).save_pretrained(folder)
    return AUTO_CLASSES[task].from_pretrained(folder)


def trained(task: str, tmp_path: Path):
    """A tiny UMEMA BERT after a few steps (so its memory bank holds writes) and one evaluation."""
    base = tiny_base(task, tmp_path / "base")
    model = get_peft_model(base, UMEMAConfig(task_type=task, r=4, memory_size=8))

    def compute_metrics(evaluation):
        probs = torch.from_numpy(evaluation.predictions[0]).softmax(-1)
        return classification_metrics(probs, evaluation.label_ids)

    trainer = UMEMATrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, report_to=[],
                               learning_rate=1e-2, save_strategy="no", use_cpu=True, disable_tqdm=True),
        train_dataset=rows(task),
        eval_dataset=rows(task, seed=10),
        compute_metrics=compute_metrics if task == "SEQ_CLS" else None,
    )
    trainer.train()
    trainer.evaluate(metric_key_prefix="test")
    return model.eval(), trainer


def bank_of(model):
    return model.base_model.umema_modules["default"].memory.bank


def assert_same_outputs(pushed, pulled, task):
    batch = tiny_batch(task=task, seed=99)
    batch.pop("labels")
    with torch.no_grad():
        expected, actual = pushed(**batch), pulled(**batch)
    for name in ("logits", "confidence", "aleatoric", "epistemic", "temperature"):
        assert torch.equal(expected[name], actual[name]), name
    for name in ("keys", "values", "write_pointer", "fill_count"):
        assert torch.equal(getattr(bank_of(pushed), name), getattr(bank_of(pulled), name)), name


def test_push_from_trainer_then_pull_reproduces_outputs_and_memory(hub, tmp_path):
    model, trainer = trained("SEQ_CLS", tmp_path)
    assert int(bank_of(model).fill_count) > 0
    result = push_to_hub(trainer, "someone/tiny-umema", token=TOKEN, endpoint=ENDPOINT)
    assert result.startswith(ENDPOINT)
    assert hub.calls == [("create_repo", ENDPOINT, TOKEN), ("upload_folder", ENDPOINT, TOKEN)]

    pulled_dir = hub.pull("someone/tiny-umema", tmp_path / "pulled")
    saved = load_file(pulled_dir / "adapter_model.safetensors")
    assert any(key.endswith("bank.keys") for key in saved) and any(key.endswith("bank.fill_count") for key in saved)
    pulled = PeftModel.from_pretrained(tiny_base("SEQ_CLS", tmp_path / "base"), pulled_dir).eval()
    assert_same_outputs(model, pulled, "SEQ_CLS")

    card = (pulled_dir / "README.md").read_text()
    assert "import peft_umema" in card and "sequence classification" in card
    assert f"`{tmp_path / 'base'}`" in card
    last = trainer.state.log_history[-1]
    assert f"| ECE (15 bins) | {last['test_ece']:.4f} |" in card
    assert f"| Accuracy | {last['test_accuracy']:.4f} |" in card and "`test_*` metrics" in card
    assert card.startswith("---\n") and "library_name: peft" in card


def test_push_from_model_of_a_token_task(hub, tmp_path):
    model, _ = trained("TOKEN_CLS", tmp_path)
    push_to_hub(model, "someone/tagger", endpoint=ENDPOINT, metrics={"f1": 0.5, "ece": 0.125})
    pulled_dir = hub.pull("someone/tagger", tmp_path / "pulled")
    pulled = PeftModel.from_pretrained(tiny_base("TOKEN_CLS", tmp_path / "base"), pulled_dir).eval()
    assert_same_outputs(model, pulled, "TOKEN_CLS")
    card = (pulled_dir / "README.md").read_text()
    assert "token classification" in card
    assert "| Entity span F1 | 0.5000 |" in card and "| ECE (15 bins) | 0.1250 |" in card
    assert not (pulled_dir / run.RUN_INFO_NAME).exists()  # no tokenizer given: not a complete run folder


def test_push_of_a_run_folder_keeps_it_usable_for_predict(hub, tmp_path, shared_data):
    backbone = save_tiny_backbone(tmp_path / "tiny-bert")
    data = save_ner_slice(shared_data, tmp_path / "ner.txt", sentences=60)
    run_dir = tmp_path / "run"
    metrics = run.train(str(backbone), str(data), run_dir, shots=16, epochs=1, batch_size=8, max_length=48,
                        progress=False)
    push_to_hub(run_dir, "someone/ner-run", endpoint=ENDPOINT)
    pulled_dir = hub.pull("someone/ner-run", tmp_path / "pulled")
    assert {"metrics.json", "reliability.png", run.RUN_INFO_NAME, "tokenizer.json"} <= {
        p.name for p in pulled_dir.iterdir()
    }
    card = (pulled_dir / "README.md").read_text()
    assert f"| Entity span F1 | {metrics['test']['f1']:.4f} |" in card
    assert f"| ECE (15 bins) | {metrics['test']['ece']:.4f} |" in card
    assert "test split" in card and "import peft_umema" in card

    texts = ["Angela Merkel visited Paris ."]
    assert run.predict(pulled_dir, texts) == run.predict(run_dir, texts)
    assert json.loads((pulled_dir / run.RUN_INFO_NAME).read_text())["backbone"] == str(backbone)


def test_push_rejects_other_objects(hub):
    with pytest.raises(TypeError, match="PeftModel"):
        push_to_hub(tiny_model("bert"), "someone/plain")
    with pytest.raises(FileNotFoundError, match="umema_run.json"):
        push_to_hub(Path(__file__).parent, "someone/folder")


def test_trainer_push_to_hub_writes_the_umema_card(hub, tmp_path):
    model, trainer = trained("SEQ_CLS", tmp_path)
    trainer.args.hub_model_id = "someone/from-trainer"
    trainer.push_to_hub(token=TOKEN)  # the stand-in hub intercepts create_repo / upload_folder
    assert [call[2] for call in hub.calls] == [TOKEN, TOKEN]
    pulled_dir = hub.pull("someone/from-trainer", tmp_path / "pulled")
    assert "import peft_umema" in (pulled_dir / "README.md").read_text()
    pulled = PeftModel.from_pretrained(tiny_base("SEQ_CLS", tmp_path / "base"), pulled_dir).eval()
    assert_same_outputs(model, pulled, "SEQ_CLS")
