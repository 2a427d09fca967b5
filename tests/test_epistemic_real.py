"""UMEMA's epistemic uncertainty rises on text unlike what its memory holds, on real MiniLM weights.

The memory is filled as training fills it (training-mode forward passes, one commit per batch) with SemEval-2010
sentences, and its novelty references are set from them as training ends; held-out SemEval sentences must then look
familiar, 20 Newsgroups messages and word-shuffled training sentences unfamiliar.
"""

import random
import tarfile

import numpy as np
import torch
from conftest import SHARED_DATA
from peft import get_peft_model
from sklearn.metrics import roc_auc_score

from peft_umema import UMEMAConfig
from peft_umema.data.loaders import load_benchmark
from peft_umema.experiments.backbones import load_backbone


def newsgroup_messages(count: int) -> list[str]:
    texts = []
    with tarfile.open(SHARED_DATA / "20newsgroups" / "20news-bydate.tar.gz") as archive:
        for member in archive:
            if member.isfile() and "20news-bydate-test" in member.name:
                body = archive.extractfile(member).read().decode("latin-1").split("\n\n", 1)[-1]
                if len(body.split()) > 20:
                    texts.append(" ".join(body.split()[:20]))  # SemEval-like length
            if len(texts) == count:
                return texts
    return texts


def batches(tokenizer, texts):
    for start in range(0, len(texts), 16):
        yield tokenizer(texts[start:start + 16], truncation=True, max_length=64, padding=True, return_tensors="pt")


def epistemic(model, tokenizer, texts, train: bool = False) -> np.ndarray:
    values = []
    for batch in batches(tokenizer, texts):
        if train:
            model.train()
            model(**batch)
            model.base_model.commit_memory()
            continue
        model.eval()
        with torch.no_grad():
            values.append(model(**batch).epistemic)
    return torch.cat(values).numpy() if values else np.zeros(0)


def auroc(familiar: np.ndarray, unfamiliar: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(familiar)), np.ones(len(unfamiliar))], np.r_[familiar, unfamiliar])


def test_epistemic_is_higher_on_out_of_domain_and_word_shuffled_text():
    sentences = list(load_benchmark(str(SHARED_DATA / "semeval2010_task8"))["train"]["text"])
    torch.manual_seed(0)
    base, tokenizer = load_backbone("minilm", "SEQ_CLS", num_labels=19)
    model = get_peft_model(base, UMEMAConfig(task_type="SEQ_CLS", r=8, memory_size=32))
    training = sentences[:512]
    epistemic(model, tokenizer, training, train=True)  # 32 commits: a full bank of SemEval batches
    assert model.base_model.refresh_novelty_references(batches(tokenizer, training)) == 512
    in_domain = epistemic(model, tokenizer, sentences[1000:1064])
    out_of_domain = epistemic(model, tokenizer, newsgroup_messages(64))
    score = auroc(in_domain, out_of_domain)
    print(f"epistemic: in-domain {in_domain.mean():.3f}, out-of-domain {out_of_domain.mean():.3f}, AUROC {score:.3f}")
    assert out_of_domain.mean() > in_domain.mean() and score > 0.9, (in_domain.mean(), out_of_domain.mean(), score)

    rng = random.Random(0)
    seen = training[:64]
    shuffled = [" ".join(rng.sample(text.split(), len(text.split()))) for text in seen]
    score = auroc(epistemic(model, tokenizer, seen), epistemic(model, tokenizer, shuffled))
    assert score > 0.9, score  # the contextual summaries of shuffled sentences match no training example
