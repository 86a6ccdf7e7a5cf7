"""What `SafetyDPOTrainer` pushes to the Hub: the expert's files (docs/hub.md), never a pickle.

transformers' `Trainer.push_to_hub` uploads the whole `output_dir` (with `training_args.bin`, a pickle, the trainer
state and the TensorBoard runs), and its checkpoint pushes copy weights into `output_dir`. An expert's push is one
commit of `PUSHED_FILES` (and the TensorBoard runs with `push_logs`), read from the expert's or the checkpoint's
folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.trainer_utils import HubStrategy, SaveStrategy

from safety_dpo.trainer import adapter_io

PUSHED_FILES = (adapter_io.LORA_WEIGHT_NAME, adapter_io.METADATA_NAME, "README.md")  # docs/hub.md: what a push holds
LOGS_DIR = "runs"  # where transformers' TensorBoard callback writes, unless TENSORBOARD_LOGGING_DIR says otherwise


class ExpertPushMixin:
    """`push_to_hub` and the checkpoint pushes of `SafetyDPOTrainer` (a `transformers.Trainer`)."""

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ):
        """Save the expert into `output_dir` and upload it in one commit: `PUSHED_FILES` (the weights,
        `safety_dpo.json`, the card) and, with `push_logs`, the TensorBoard runs. Nothing else: not
        `training_settings.json`, `trainer_state.json`, the precomputed cache nor checkpoints, and never a pickle.

        Arguments as `Trainer.push_to_hub`'s (`kwargs`, which it passes to its own card, are not used: the card is
        `hub_cards/adapter_card.md`). Returns the `CommitInfo`, or a `Future` of it when not `blocking`.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        revision = revision if revision is not None else self.args.hub_revision
        return self._upload(self.args.output_dir, commit_message or "End of training", token, revision, blocking)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """With `hub_strategy="every_save"`: upload the checkpoint's expert files as `push_to_hub` does, straight
        from the checkpoint (`Trainer` copies weights into `output_dir` and adds `training_args.bin`, a pickle; a
        `safety_dpo.json` there would also mark an unfinished expert as finished)."""
        from transformers.utils import PushInProgress

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        job = self._upload(checkpoint_folder, message, self.args.hub_token, self.args.hub_revision, blocking=False)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    def _upload(self, expert_dir: str, commit_message: str, token: str | None, revision: str | None, blocking: bool):
        """`upload_expert` of `expert_dir` to this trainer's repo, with the TensorBoard runs under `push_logs`."""
        logs_root = Path(self.args.output_dir) if self.args.push_logs else None
        return upload_expert(expert_dir, self.hub_model_id, commit_message, token, revision, blocking, logs_root)


def upload_expert(
    expert_dir: str | Path,
    repo_id: str,
    commit_message: str,
    token: str | None = None,
    revision: str | None = None,
    blocking: bool = True,
    logs_root: Path | None = None,
):
    """One commit of `expert_dir`'s `PUSHED_FILES` and, when `logs_root` is given, of `logs_root/runs/`. Every file
    is read now: TensorBoard keeps appending to its event files, and a rotated checkpoint may be gone before the
    upload. Returns the `CommitInfo`, or a `Future` of it when not `blocking`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    import safety_dpo

    files = {name: Path(expert_dir) / name for name in PUSHED_FILES}
    if logs_root is not None:
        logs = sorted((logs_root / LOGS_DIR).rglob("*"))
        files.update({path.relative_to(logs_root).as_posix(): path for path in logs})
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=path.read_bytes())
        for name, path in files.items()
        if path.is_file()
    ]
    api = HfApi(library_name="safety_dpo", library_version=safety_dpo.__version__)
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        token=token,
        revision=revision,
        run_as_future=not blocking,
    )
