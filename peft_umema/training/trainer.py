"""`UMEMATrainer`: the HF Trainer with the memory callback added and UMEMA's model card on `push_to_hub`."""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from .callbacks import MemoryUpdateCallback, find_umema_tuner


class UMEMATrainer(Trainer):
    """`Trainer` for UMEMA adapters.

    The model computes the joint objective itself, once per micro-batch:

    loss = [ sum CE(calibrated logits, y) + lambda_c * sum BCE(confidence, prediction is correct) ] / N

    where the sums run over the labelled examples (SEQ_CLS) or tokens (TOKEN_CLS) and N is the number of labelled
    items in the whole accumulated batch (`num_items_in_batch`, which the Trainer passes on), so gradient
    accumulation over k micro-batches gives the same gradient as one k-times larger batch, and data parallelism the
    same as one process. Both terms are logged as `task_loss` and `confidence_loss` (means per labelled item since
    the last log, summed across ranks). A `MemoryUpdateCallback` is added unless one is passed.
    """

    def __init__(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, MemoryUpdateCallback) for c in callbacks):
            callbacks.insert(0, MemoryUpdateCallback())  # first, so other callbacks see the committed bank
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if find_umema_tuner(self.model) is None:
            raise ValueError("UMEMATrainer needs a model from get_peft_model(model, UMEMAConfig(...)).")
        # the model normalises by num_items_in_batch: make the Trainer count labelled items and pass them on
        self.model_accepts_loss_kwargs = True

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs: add UMEMA's terms before the Trainer records them in log_history
            logs.update(MemoryUpdateCallback.training_logs(self.model))
        super().log(logs, *args, **kwargs)

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token=None, revision=None,
                    **kwargs):
        """Upload the adapter with its memory and a `peft_umema` model card (base model, task, the last
        evaluation's calibration figures, `import peft_umema`), instead of peft's generic card."""
        from ..hub import push_to_hub

        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        return push_to_hub(
            self, repo_id, token=token or self.args.hub_token, private=self.args.hub_private_repo,
            commit_message=commit_message,
        )
