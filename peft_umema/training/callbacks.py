"""`MemoryUpdateCallback`: commits EMA memory writes after each optimizer step and logs UM/EMA state."""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from ..tuner.model import UMEMAModel


def find_umema_tuner(model) -> Optional[UMEMAModel]:
    """The UMEMAModel inside a PeftModel, possibly wrapped by DDP/accelerate; None for other models."""
    while hasattr(model, "module"):
        model = model.module
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, UMEMAModel) else None


class MemoryUpdateCallback(TrainerCallback):
    """Keeps the memory bank in step with training when used with any `transformers.Trainer`.

    - after every optimizer step, commits the mini-batch writes queued during that step's forward passes (with
      gradient accumulation: one write per micro-batch, in order); under data parallelism all ranks write the
      rank-averaged summary, so their banks stay identical;
    - at the start of training (and whenever `set_task` names a new task), selects the task embedding and starts
      a fresh bank if the task changed;
    - stops training with a clear error when the loss became NaN or inf, before that step is checkpointed;
    - at the end of training (after the best checkpoint is loaded back), sets the bank's novelty references from
      the final model over the training data (`UMEMAModel.refresh_novelty_references`): one extra pass in eval
      mode, so that `epistemic` measures novelty against the model that predicts;
    - adds `task_loss`, `confidence_loss`, `memory_fill`, `mean_confidence` and `mean_temperature` to every
      training log.

    `UMEMATrainer` adds it automatically; with a plain `Trainer` pass `callbacks=[MemoryUpdateCallback()]`.
    """

    def __init__(self, task_id: Optional[int] = None):
        self.task_id = task_id
        self._task_applied = False

    def set_task(self, task_id: int) -> None:
        """Train the next steps on another task: its embedding K_t and a fresh memory bank."""
        self.task_id = task_id
        self._task_applied = False

    def _apply_task(self, model) -> None:
        tuner = find_umema_tuner(model)
        if tuner is not None and self.task_id is not None and not self._task_applied:
            tuner.set_task(self.task_id)
        self._task_applied = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply_task(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply_task(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tuner = find_umema_tuner(model)
        if tuner is not None:
            tuner.check_training_finite(state.global_step)
            tuner.commit_memory(step=state.global_step)

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        tuner = find_umema_tuner(model)
        if tuner is not None and train_dataloader is not None:
            for name, modules in tuner.umema_modules.items():
                if modules.memory is not None and name in tuner.active_adapters:
                    tuner.refresh_novelty_references(train_dataloader, name, seed=args.seed)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update(self.training_logs(model))

    @staticmethod
    def training_logs(model) -> dict:
        """Loss terms, UM means (reduced across ranks; consumed by the first caller) and the memory fill."""
        tuner = find_umema_tuner(model)
        if tuner is None:
            return {}
        logs = tuner.training_log.pop()
        try:
            logs["memory_fill"] = tuner.memory_stats()["memory_fill"]
        except KeyError:  # use_ema=False
            pass
        return logs
