# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Hub uploads from a training run: the token, and a background pusher that never stops training."""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Sequence

from .checkpoints import CHECKPOINT_PREFIX
from .errors import UsageError


logger = logging.getLogger(__name__)

# Staging folders of `HubPusher` sit next to the folder being uploaded; never upload or resume from them.
HUB_STAGING_PREFIX = ".hub-upload-"


def resolve_hub_token(token: str | None) -> str:
    """The Hub token to push with: `token`, else the one huggingface_hub finds (HF_TOKEN, `hf auth login`)."""
    if token:
        return token
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UsageError(
            "--push_to_hub needs a Hub token with write access: pass --hub_token, set the HF_TOKEN environment "
            "variable, or run `hf auth login` before training."
        )
    return token


class HubPusher:
    """Uploads folders to a Hub repository in a background thread, in order, without ever stopping training.

    A Hub that fails or cannot be reached only produces warnings: the local files are left untouched. Each
    folder is snapshotted (hard links, or a copy where linking fails) when it is queued, so pruning an old
    checkpoint while its upload waits does not break the upload. Create it on the main process only.
    """

    def __init__(self, repo_id: str, token: str | None, private: bool = False):
        from huggingface_hub import HfApi

        self.api = HfApi(token=token)
        self.repo_id = repo_id
        self.enabled = True
        try:
            self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        except Exception as error:  # noqa: BLE001 - any Hub failure must leave training running
            logger.warning(
                f"Could not create or reach Hub repository {repo_id!r} ({type(error).__name__}: {error}). "
                "Pushing to the Hub is disabled for this run; checkpoints and the model are still saved locally."
            )
            self.enabled = False
        self.failed_uploads: list[str] = []  # folders whose upload failed (each also logged as a warning)
        self._queue: queue.Queue = queue.Queue()
        self._worker = None

    def push_folder(
        self,
        folder: str,
        path_in_repo: str | None = None,
        commit_message: str = "",
        ignore_patterns: Sequence[str] | str | None = None,
    ) -> None:
        """Queues `folder` for upload to `path_in_repo` (the repo root when None) and returns at once."""
        if not self.enabled:
            logger.warning(f"Hub pushing is disabled; {folder} stays local only.")
            return
        if isinstance(ignore_patterns, str):
            ignore_patterns = [ignore_patterns]
        patterns = list(ignore_patterns or []) + [f"*{HUB_STAGING_PREFIX}*", f"*.tmp-{CHECKPOINT_PREFIX}*"]
        try:
            staging = self._snapshot(folder, patterns)
        except OSError as error:
            logger.warning(f"Could not prepare {folder} for upload ({error}); it stays local only.")
            return
        commit_message = commit_message or f"Upload {os.path.basename(folder)}"
        self._queue.put((folder, staging, path_in_repo, commit_message, patterns))
        if self._worker is None:
            # Daemon: an upload stuck on a dead connection must not keep the finished process alive.
            self._worker = threading.Thread(target=self._run, name="hub-pusher", daemon=True)
            self._worker.start()

    @staticmethod
    def _snapshot(folder: str, ignore_patterns: list[str]) -> str:
        """Hard-links (or copies) the files to upload into a staging folder next to `folder`."""
        folder = os.path.abspath(folder)
        staging = tempfile.mkdtemp(prefix=HUB_STAGING_PREFIX, dir=os.path.dirname(folder))

        def link_or_copy(source, destination):
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)

        def ignored(directory, names):
            # The patterns of `upload_folder` (fnmatch on the path relative to the folder), applied early so that
            # skipped files (e.g. checkpoints/*) are not even linked.
            relative = os.path.relpath(directory, folder)
            skipped = set()
            for name in names:
                path = name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")
                candidates = [path, f"{path}/"] if os.path.isdir(os.path.join(directory, name)) else [path]
                if any(fnmatch.fnmatch(c, pattern) for c in candidates for pattern in ignore_patterns):
                    skipped.add(name)
            return skipped

        try:
            shutil.copytree(folder, os.path.join(staging, "content"), copy_function=link_or_copy, ignore=ignored)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _run(self) -> None:
        while True:
            folder, staging, path_in_repo, commit_message, ignore_patterns = self._queue.get()
            try:
                self.api.upload_folder(
                    repo_id=self.repo_id,
                    folder_path=os.path.join(staging, "content"),
                    path_in_repo=path_in_repo,
                    commit_message=commit_message,
                    ignore_patterns=ignore_patterns,
                )
                logger.info(f"Uploaded {folder} to {self.repo_id}/{path_in_repo or ''}.")
            except Exception as error:  # noqa: BLE001 - a failed upload must not stop training
                self.failed_uploads.append(folder)
                logger.warning(
                    f"Upload of {folder} to Hub repository {self.repo_id!r} failed ({type(error).__name__}: "
                    f"{error}). Training continues; the local copy is kept."
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                self._queue.task_done()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until every queued upload has finished (or `timeout` seconds have passed)."""
        with self._queue.all_tasks_done:
            finished = self._queue.all_tasks_done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)
        if not finished:
            logger.warning(f"Hub uploads still running after {timeout} s; they are abandoned when the process exits.")

