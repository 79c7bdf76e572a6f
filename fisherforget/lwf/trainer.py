"""LWF inside ``transformers``' ``Trainer``: a callback, and a ``Trainer`` subclass wiring it up.

::

    from fisherforget.lwf import LWFConfig, LWFTrainer, LearningWithForgetting

    lwf = LearningWithForgetting(None, None, forget_samples, LWFConfig(every=50, steps=5, lr=1e-4))
    trainer = LWFTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                         data_collator=collator, lwf=lwf)          # builds a FisherAdamW
    trainer.train()                          # or trainer.train(resume_from_checkpoint=True)

or, with any ``Trainer`` and your own ``FisherAdamW``::

    trainer = Trainer(..., optimizers=(FisherAdamW(model.parameters(), lr=3e-4), None),
                      callbacks=[LWFCallback(lwf)])

What the integration does:

* unlearning runs in ``on_step_end``, i.e. after each *optimizer* step (so once per
  ``gradient_accumulation_steps`` micro-batches), after ``Trainer`` has zeroed the gradients;
* mixed precision: ``accelerate`` wraps the model's ``forward`` in autocast when ``bf16``/``fp16``
  is on, and the unlearning and scoring passes call that same ``forward``, so they run in the same
  precision (fp16 ascent steps are not loss-scaled: prefer bf16);
* checkpoints: ``on_save`` writes the LWF state (step, scores, selection, ``theta_0``, RNG) to
  ``<output_dir>/checkpoint-<step>/lwf_state.pt``; on resume it is loaded back with
  ``torch.load(weights_only=True)`` (``LWFTrainer`` also finds it for a checkpoint outside
  ``output_dir``), so a resumed run continues exactly;
* the interleaved schedule (``LWFConfig(interleave=k)``): ``LWFTrainer.compute_loss`` adds the
  unlearning term to each micro-batch's loss (:meth:`LearningWithForgetting.interleaved_loss`);
  with ``LWFCallback`` alone, do the same in your own ``compute_loss``;
* logs: each phase adds ``lwf/fc_*`` (FC statistics), ``lwf/selected``, ``lwf/unlearn_loss*``,
  ``lwf/forget_loss`` (forgetting-task loss on ``D_self``) and ``lwf/freeze_above`` to the Trainer's
  logs (``trainer.state.log_history`` and every logging integration).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from fisherforget.lwf.loop import LearningWithForgetting
from fisherforget.optim import FisherAdamW

__all__ = ["LWFCallback", "LWFTrainer", "STATE_FILE"]

STATE_FILE = "lwf_state.pt"


class LWFCallback(TrainerCallback):
    """Runs a :class:`LearningWithForgetting` inside ``Trainer.train()``.

    Args:
        lwf: the helper; it is bound to the Trainer's model and (unwrapped) optimizer at the start
            of training, which must be a ``FisherAdamW``.
        trainer: when given (``LWFTrainer`` does this), statistics go through ``trainer.log`` and
            reach every logging integration; otherwise they are appended to
            ``state.log_history``.
    """

    def __init__(self, lwf: LearningWithForgetting, trainer: Optional[Trainer] = None):
        if not isinstance(lwf, LearningWithForgetting):
            raise TypeError("lwf must be a fisherforget.lwf.LearningWithForgetting")
        self.lwf = lwf
        self.trainer = trainer
        self.resume_dir: Optional[str] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("LWFCallback needs the Trainer's model and optimizer")
        if state.global_step == 0 and self.lwf.global_step > 0:
            raise RuntimeError(
                f"this LearningWithForgetting already ran {self.lwf.global_step} learning steps "
                "and train() starts again at step 0: give a new LearningWithForgetting to a new "
                "run, or resume from a checkpoint (train(resume_from_checkpoint=...))")
        self.lwf.bind(model, optimizer)
        if state.global_step > 0 and self.lwf.global_step != state.global_step:
            self._load(args, state)
        stats = self.lwf.begin(state.max_steps)
        if stats:
            self._log(state, stats)

    def on_step_end(self, args, state, control, **kwargs):
        stats = self.lwf.step()
        if self.lwf.global_step != state.global_step:
            raise RuntimeError(
                f"LWF is at learning step {self.lwf.global_step} but the Trainer at "
                f"{state.global_step}: was the LWF state restored on resume?"
            )
        if stats:
            self._log(state, stats)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.lwf.state_dict(), os.path.join(folder, STATE_FILE))

    def _load(self, args, state) -> None:
        candidates = [self.resume_dir] if self.resume_dir else []
        candidates.append(
            os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        )
        for folder in candidates:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                try:
                    # weights_only: tensors and plain containers only, so a tampered file
                    # cannot run code.
                    saved = torch.load(path, weights_only=True, map_location="cpu")
                except Exception as error:
                    raise RuntimeError(f"{path} is not an LWF state this version can load "
                                       f"safely (weights_only=True): {error}") from error
                self.lwf.load_state_dict(saved)
                if self.lwf.global_step != state.global_step:
                    raise RuntimeError(
                        f"{path} holds LWF state of step {self.lwf.global_step}, the checkpoint is "
                        f"at step {state.global_step}"
                    )
                return
        raise RuntimeError(
            f"resuming at step {state.global_step} but no {STATE_FILE} was found in {candidates}; "
            "use LWFTrainer.train(resume_from_checkpoint=...) or call lwf.load_state_dict() first"
        )

    def _log(self, state, stats: dict[str, float]) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(stats))
        else:
            state.log_history.append({**stats, "step": state.global_step})
            # Printed as the Trainer prints its own logs (str(logs), main process only);
            # tqdm.write keeps a running progress bar intact.
            if state.is_world_process_zero:
                from tqdm.auto import tqdm

                tqdm.write(str(dict(stats)))


class LWFTrainer(Trainer):
    """``Trainer`` with Learning With Forgetting.

    Unless an optimizer is given (``optimizers=`` or ``optimizer_cls_and_kwargs=``), it builds a
    :class:`~fisherforget.FisherAdamW` from the training arguments (``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay`` with the usual no-decay groups) plus
    ``fisher_kwargs`` (default ``{"fisher": "ema", "fisher_beta": 0.99}``).

    Args:
        lwf: the :class:`LearningWithForgetting` helper (model/optimizer may be ``None``; they
            are bound when training starts).
        fisher_kwargs: extra ``FisherAdamW`` arguments.
        Everything else goes to ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, lwf: LearningWithForgetting,
                 fisher_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lwf = lwf
        self.fisher_kwargs = {"fisher": "ema", "fisher_beta": 0.99, **(fisher_kwargs or {})}
        self.lwf_callback = LWFCallback(lwf, trainer=self)
        self.add_callback(self.lwf_callback)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = (FisherAdamW, {
                "lr": self.args.learning_rate,
                "betas": (self.args.adam_beta1, self.args.adam_beta2),
                "eps": self.args.adam_epsilon,
                **self.fisher_kwargs,
            })
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        """``Trainer.compute_loss``, plus the interleaved unlearning term when
        ``lwf.config.interleave`` is set."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.lwf.config.interleave is None or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        samples = inputs["input_ids"].shape[0] if "input_ids" in inputs else 1
        loss = self.lwf.interleaved_loss(loss, samples)
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        self.lwf_callback.resume_dir = folder if isinstance(folder, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)
