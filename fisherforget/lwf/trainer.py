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
  ``<output_dir>/checkpoint-<step>/lwf_state.pt`` as tensors and plain Python values only; on
  resume it is loaded back with ``torch.load(weights_only=True)``, so a tampered file cannot run
  code (``LWFTrainer`` also finds it for a checkpoint outside ``output_dir``), and a resumed run
  continues exactly. Resuming needs the optimizer state too (its Fisher and moments drive the
  scores and the protection): a checkpoint saved with ``save_only_model=True`` is refused;
* one ``LearningWithForgetting`` per run: a second ``train()`` from step 0 on a helper that
  already ran is refused (resume instead, or build a new helper and trainer);
* the interleaved schedule (``LWFConfig(interleave=k)``): ``LWFTrainer.compute_loss`` adds the
  unlearning term to each micro-batch's loss (:meth:`LearningWithForgetting.interleaved_loss`);
  with ``LWFCallback`` alone, do the same in your own ``compute_loss``;
* logs: each phase adds ``lwf/fc_*`` (FC statistics), ``lwf/selected``, ``lwf/unlearn_loss*``,
  ``lwf/forget_loss`` (forgetting-task loss on ``D_self``) and ``lwf/freeze_above`` to the Trainer's
  logs (``trainer.state.log_history`` and every logging integration).
"""

from __future__ import annotations

import numbers
import os
import warnings
import weakref
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from fisherforget.lwf.loop import LearningWithForgetting, _unwrap_optimizer
from fisherforget.optim import FisherAdamW

__all__ = ["LWFCallback", "LWFTrainer", "STATE_FILE", "weights_only_state"]

STATE_FILE = "lwf_state.pt"

# Which callback drives each LearningWithForgetting in which Trainer run (its TrainerState), to
# catch two callbacks stepping one helper twice per optimizer step.
_DRIVERS: "weakref.WeakKeyDictionary[LearningWithForgetting, tuple[Any, Any]]" = (
    weakref.WeakKeyDictionary())


def weights_only_state(value: Any, where: str = "state") -> Any:
    """``value`` (e.g. :meth:`LearningWithForgetting.state_dict`) with only what
    ``torch.load(weights_only=True)`` accepts: tensors (subclasses such as ``nn.Parameter`` become
    plain tensors), ``None``, bools, ints, floats, strings, and lists, tuples and dicts of them.
    NumPy scalars and arrays (an ``LWFConfig(lr=np.float64(...))`` carries them into the
    state) become Python numbers and tensors. Anything else is a :class:`TypeError` naming where
    it is, raised when saving rather than when a resume could no longer load the file."""
    if value is None or isinstance(value, (bool, str, bytes, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        return value if type(value) is torch.Tensor else value.detach().as_subclass(torch.Tensor)
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        # NumPy scalars (np.float64 is also a float, but pickles as NumPy) and arrays.
        return weights_only_state(value.item()) if value.ndim == 0 else torch.as_tensor(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        return {weights_only_state(k, f"{where} key"): weights_only_state(v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [weights_only_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which "
                    "torch.load(weights_only=True) refuses: store tensors and plain Python values")


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
        driver = _DRIVERS.get(self.lwf)
        if driver is not None and driver[0] is not self and driver[1] is state:
            raise ValueError("callbacks: two LWFCallbacks drive the same LearningWithForgetting "
                             "in this Trainer (each would step it once per optimizer step); "
                             "pass one (LWFTrainer adds its own)")
        _DRIVERS[self.lwf] = (self, state)
        if state.global_step == 0 and self.lwf.global_step > 0:
            raise RuntimeError(
                f"this LearningWithForgetting already ran {self.lwf.global_step} learning steps "
                "and train() starts again at step 0: give a new LearningWithForgetting to a new "
                "run, or resume from a checkpoint (train(resume_from_checkpoint=...))")
        if state.global_step > 0 and not _unwrap_optimizer(optimizer).state:
            # The Fisher and the moments live in the optimizer state; without them the scores
            # and the protection of a resumed run would silently start from nothing.
            raise RuntimeError(
                f"resuming at step {state.global_step} without the optimizer state (its Fisher "
                "and moments, which LWF's scores and protection need): the checkpoint holds no "
                "optimizer.pt, e.g. it was saved with save_only_model=True. Resume from a full "
                "checkpoint, or start a new run from the saved model")
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
                f"{state.global_step}: was the LWF state restored on resume, or do two "
                "LWFCallbacks drive the same LearningWithForgetting?"
            )
        if stats:
            self._log(state, stats)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"LWF state not saved: the checkpoint folder {folder} does not exist, so "
                          "this checkpoint cannot resume LWF", UserWarning, stacklevel=2)
            return
        # Plain values only, so that resuming can load it with weights_only=True.
        torch.save(weights_only_state(self.lwf.state_dict()), os.path.join(folder, STATE_FILE))

    def _load(self, args, state) -> None:
        candidates = [os.fspath(self.resume_dir)] if self.resume_dir else []
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
    ``fisher_kwargs`` (default ``{"fisher": "ema", "fisher_beta": 0.99}``). A given optimizer
    must be a ``FisherAdamW``, and ``args.optim`` must stay at its AdamW default (another choice
    is an error, not silently replaced). It adds its own :class:`LWFCallback`: do not pass one.

    Args:
        lwf: the :class:`LearningWithForgetting` helper (model/optimizer may be ``None``; they
            are bound when training starts).
        fisher_kwargs: extra ``FisherAdamW`` arguments.
        Everything else goes to ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, lwf: LearningWithForgetting,
                 fisher_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any):
        if not isinstance(lwf, LearningWithForgetting):
            raise TypeError(f"lwf must be a fisherforget.lwf.LearningWithForgetting, got "
                            f"{type(lwf).__name__}")
        if fisher_kwargs is not None and not isinstance(fisher_kwargs, dict):
            raise TypeError(f"fisher_kwargs must be a dict of FisherAdamW arguments, got "
                            f"{type(fisher_kwargs).__name__}")
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        if optimizer is not None and not isinstance(_unwrap_optimizer(optimizer), FisherAdamW):
            raise TypeError(f"optimizers: LWF needs a fisherforget.FisherAdamW, got "
                            f"{type(optimizer).__name__}")
        cls_and_kwargs = kwargs.get("optimizer_cls_and_kwargs")
        if cls_and_kwargs is not None and not (isinstance(cls_and_kwargs[0], type)
                                               and issubclass(cls_and_kwargs[0], FisherAdamW)):
            raise TypeError(f"optimizer_cls_and_kwargs: LWF needs fisherforget.FisherAdamW, got "
                            f"{getattr(cls_and_kwargs[0], '__name__', cls_and_kwargs[0])!r}")
        if any(isinstance(c, LWFCallback) or c is LWFCallback
               for c in kwargs.get("callbacks") or ()):
            raise ValueError("callbacks: LWFTrainer adds its own LWFCallback; a second one would "
                             "run every unlearning phase twice")
        super().__init__(*args, **kwargs)
        optim = getattr(self.args.optim, "value", self.args.optim)
        if (optimizer is None and cls_and_kwargs is None
                and optim not in ("adamw_torch", "adamw_torch_fused")):
            # Trainer would build that optimizer; LWF needs a FisherAdamW, built here instead.
            raise ValueError(f"args.optim={optim!r}: LWFTrainer builds a FisherAdamW (AdamW with "
                             "a Fisher), so leave optim at its AdamW default, or pass "
                             "optimizers=(FisherAdamW(...), None)")
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
        self.lwf_callback.resume_dir = (os.fspath(folder) if isinstance(folder, (str, os.PathLike))
                                        else None)
        return super().train(resume_from_checkpoint, *args, **kwargs)
