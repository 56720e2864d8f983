"""The job store: one SQLite database under the jobs folder, inputs and videos as files beside it.

Every state change is a committed transaction (WAL journal), so a server killed at any moment (kill -9
included) restarts with every finished video and an honest state for the rest. Job ids are generated here
(random hex); file names are derived from ids, never from anything a request sent.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINAL_STATES = (DONE, FAILED, CANCELLED)
ANIMATION, EDIT = "animation", "edit"
INTERRUPTED = "interrupted: the server stopped while this job was {state}; submit it again"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    request TEXT NOT NULL,          -- the resolved request as JSON, plus the output format (and kind for edits)
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    owner TEXT,                     -- which server process (or Ray replica) runs it
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0, -- asked to stop; the worker running it stops before its next step
    calls INTEGER NOT NULL DEFAULT 0   -- single-image UNet calls so far (a CFG step counts 2)
);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created);
"""


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    request: dict
    created: float
    started: float | None
    finished: float | None
    error: str | None
    step: int = 0
    total: int = 0
    cancel: bool = False
    owner: str = ""
    calls: int = 0

    @property
    def format(self) -> str:
        return self.request["format"]

    @property
    def kind(self) -> str:
        """"animation" or "edit" (jobs stored before edits existed are animations)."""
        return self.request.get("kind", ANIMATION)


def new_job_id() -> str:
    return secrets.token_hex(16)


def is_job_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


class StorageError(ValueError):
    """The jobs folder cannot be used (taken by another server, broken, read-only); one message with the fix."""


class StoreBusy(Exception):
    """The database stayed locked by another program past `BUSY_TIMEOUT_S`; the request may be retried."""


LOCK_FILE = "server.lock"
BUSY_TIMEOUT_S = 5.0  # a request waits this long for a database another program holds, then gets 503
WORKER_BUSY_TIMEOUT_S = 30.0  # the worker's writes (progress, results) wait longer: a job is not given up lightly


class JobStore:
    """Thread-safe: one connection guarded by a lock (the worker and the HTTP handlers share it).

    `owner=True` (the server that runs the folder): an exclusive lock on `server.lock` for the store's life
    (a second server on the same folder is refused, naming the holder; the kernel releases the lock when
    its holder dies, kill -9 included), then the temporaries a dead owner left are removed. Ray replicas
    open the owner's store without it."""

    def __init__(self, folder: str | Path, owner: bool = False):
        self.folder = Path(folder)
        self.inputs = self.folder / "inputs"
        self.videos = self.folder / "videos"
        self._lock_file = None
        try:
            for path in (self.folder, self.inputs, self.videos):
                path.mkdir(parents=True, exist_ok=True)
            if owner:
                self._lock_file = _take_folder_lock(self.folder)
            self._db = sqlite3.connect(self.folder / "jobs.sqlite3", check_same_thread=False,
                                       isolation_level=None, timeout=WORKER_BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a committed state survives the process being killed (kill -9); a power cut may lose
            # the last few commits but never corrupts the database. Progress is written every step, so no fsync.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            if "calls" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:  # an older store
                self._db.execute("ALTER TABLE jobs ADD COLUMN calls INTEGER NOT NULL DEFAULT 0")
            if owner:
                problem = self._db.execute("PRAGMA quick_check").fetchone()[0]
                if problem != "ok":
                    raise sqlite3.DatabaseError(problem)
                self._db.execute("BEGIN IMMEDIATE")  # writable: found now, not at the first job
                self._db.execute("ROLLBACK")
                self.remove_temporaries()
        except (OSError, sqlite3.Error) as err:
            if getattr(self, "_db", None) is not None:
                self._db.close()
            self._release()
            raise StorageError(_storage_message(self.folder, err)) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._release()

    def _release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the lock
            self._lock_file = None

    def remove_temporaries(self) -> int:
        """What a dead owner left: files it was writing (an upload's `.upload-*`, a video's `.NAME.*.tmp`),
        inputs of no waiting job and videos of no job. No live writer can hold them once this process owns
        the folder."""
        waiting = {row[0] for row in self._db.execute("SELECT id FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING))}
        known = {row[0] for row in self._db.execute("SELECT id FROM jobs")}
        removed = 0
        for folder, keep in ((self.inputs, waiting), (self.videos, known)):
            for path in folder.iterdir():
                if path.name.startswith(".") or path.name.split(".")[0] not in keep:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed += 1
        return removed

    # -- paths (from generated ids only) -------------------------------------------------------------
    def input_path(self, job_id: str) -> Path:
        return self.inputs / f"{job_id}.png"

    def clip_path(self, job_id: str) -> Path:
        """An edit's uploaded source clip (PyAV finds the container from the content, not the name)."""
        return self.inputs / f"{job_id}.clip"

    def remove_inputs(self, job_id: str) -> None:
        self.input_path(job_id).unlink(missing_ok=True)
        self.clip_path(job_id).unlink(missing_ok=True)

    def has_inputs(self, job: Job) -> bool:
        """What the job needs to run again: the image of an animation, the clip of an edit."""
        return (self.clip_path(job.id) if job.kind == EDIT else self.input_path(job.id)).is_file()

    def video_path(self, job: Job) -> Path:
        return self.videos / f"{job.id}.{job.format}"

    # -- writes ---------------------------------------------------------------------------------------
    def _execute(self, sql: str, params: tuple = (), busy_s: float | None = None) -> sqlite3.Cursor:
        """`busy_s`: how long to wait for a database another program holds (a request's short wait; the
        connection's longer one otherwise); past it, StoreBusy."""
        with self._lock:
            try:
                if busy_s is None:
                    return self._db.execute(sql, params)
                self._db.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
                try:
                    return self._db.execute(sql, params)
                finally:
                    self._db.execute(f"PRAGMA busy_timeout={int(WORKER_BUSY_TIMEOUT_S * 1000)}")
            except sqlite3.OperationalError as err:
                if "locked" in str(err) or "busy" in str(err):
                    raise StoreBusy(f"the job database is locked by another program ({err}); retry shortly") from err
                raise

    def add(self, job_id: str, request: dict, owner: str = "") -> Job:
        now = time.time()
        self._execute("INSERT INTO jobs (id, state, request, created, owner) VALUES (?, ?, ?, ?, ?)",
                      (job_id, QUEUED, json.dumps(request, allow_nan=False), now, owner), busy_s=BUSY_TIMEOUT_S)
        return self.get(job_id)

    def mark_running(self, job_id: str, owner: str = "") -> None:
        self._execute("UPDATE jobs SET state=?, started=?, owner=? WHERE id=? AND state=?",
                      (RUNNING, time.time(), owner, job_id, QUEUED))

    def finish(self, job_id: str, state: str, error: str | None = None) -> bool:
        """Move a job to a final state (its inputs are no longer needed); False if it already was in one
        (a cancel raced the worker)."""
        assert state in FINAL_STATES
        cursor = self._execute("UPDATE jobs SET state=?, finished=?, error=? WHERE id=? AND state IN (?, ?)",
                               (state, time.time(), error, job_id, QUEUED, RUNNING))
        if cursor.rowcount == 1:
            self.remove_inputs(job_id)
            return True
        return False

    def set_progress(self, progress: list[tuple[str, int, int, int]]) -> None:
        """(job id, steps done, steps in all, UNet calls so far) for several jobs, in one transaction."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("UPDATE jobs SET step=?, total=?, calls=? WHERE id=?",
                                     [(step, total, calls, job_id) for job_id, step, total, calls in progress])

    def request_cancel(self, job_id: str) -> None:
        self._execute("UPDATE jobs SET cancel=1 WHERE id=?", (job_id,))

    def cancel_requested(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self._execute(f"SELECT id FROM jobs WHERE cancel=1 AND id IN ({marks})", tuple(ids)).fetchall()
        return {row[0] for row in rows}

    def position(self, job_id: str) -> int | None:
        """1-based place among queued jobs (oldest first), or None when the job is not queued."""
        row = self._execute("SELECT COUNT(*) FROM jobs WHERE state=? AND created <= "
                            "(SELECT created FROM jobs WHERE id=? AND state=?)", (QUEUED, job_id, QUEUED)).fetchone()
        return row[0] or None

    def requeue(self, job_id: str) -> None:
        self._execute("UPDATE jobs SET state=?, started=NULL, step=0, calls=0 WHERE id=?", (QUEUED, job_id))

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is None:
            return
        self.video_path(job).unlink(missing_ok=True)
        self.remove_inputs(job_id)
        self._execute("DELETE FROM jobs WHERE id=?", (job_id,))

    # -- reads ----------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        row = self._execute("SELECT id, state, request, created, started, finished, error, step, total, cancel, owner, "
                            "calls FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else Job(row[0], row[1], json.loads(row[2]), *row[3:])

    def ids_in_state(self, *states: str) -> list[str]:
        marks = ",".join("?" * len(states))
        rows = self._execute(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created", states)
        return [row[0] for row in rows.fetchall()]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for state, n in self._execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall():
            counts[state] = n
        return counts

    # -- restart and expiry ---------------------------------------------------------------------------
    def recover(self, requeue: bool = False) -> list[str]:
        """After a restart: jobs left queued or running are failed with the reason, or put back in the
        queue when `requeue` (their inputs are kept until they finish). Returns the re-queued ids."""
        requeued = []
        for job_id in self.ids_in_state(QUEUED, RUNNING):
            job = self.get(job_id)
            if requeue and self.has_inputs(job):
                self.requeue(job_id)
                requeued.append(job_id)
            else:
                self.finish(job_id, FAILED, INTERRUPTED.format(state=job.state))
        return requeued

    def expire(self, older_than_s: float) -> int:
        """Delete finished jobs (and their files) that finished more than `older_than_s` ago."""
        cutoff = time.time() - older_than_s
        rows = self._execute("SELECT id FROM jobs WHERE finished IS NOT NULL AND finished < ?", (cutoff,))
        ids = [row[0] for row in rows.fetchall()]
        for job_id in ids:
            self.delete(job_id)
        return len(ids)


_STARTED: dict[str, object] = {}
_STARTED_LOCK = threading.RLock()


def started_in_process() -> tuple[dict[str, object], threading.RLock]:
    """The server state (`state.ServerState`) started in this process per jobs folder, and its lock. Here, a
    module function, not on the app: Ray pickles the app by value, its server state with it, so each copy has
    its own, but a module's function by reference, so every copy of the app in a process finds this one
    registry."""
    return _STARTED, _STARTED_LOCK


def _take_folder_lock(folder: Path):
    """An exclusive, non-blocking lock on `folder/server.lock`, holding who took it (pid, host, time) for
    the message a second server gets."""
    import fcntl

    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StorageError(f"the jobs folder {folder} is in use by another server ({holder}); stop that server "
                           "or give this one another --jobs folder") from None
    except OSError:
        handle.close()
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n")
    handle.flush()
    return handle


def _storage_message(folder: Path, err: BaseException) -> str:
    if isinstance(err, StorageError):
        return str(err)
    text = getattr(err, "strerror", None) or str(err)
    if isinstance(err, sqlite3.DatabaseError) and not isinstance(err, sqlite3.OperationalError) or \
            "not a database" in text or "malformed" in text:
        return (f"the job database {folder / 'jobs.sqlite3'} is damaged ({text}); move it aside (its jobs are "
                "lost) or give another --jobs folder")
    return (f"the jobs folder {folder} cannot be used ({text}); give a writable folder as --jobs "
            "(it is created if missing)")
