"""The job store: every job as a SQLite row (Python's sqlite3, one file under the output folder), so jobs
outlive the server process. Finished jobs keep their PNGs here, not in memory; what is kept is bounded in
bytes, the oldest finished jobs forgotten first. A queued job keeps the request as it came (its images
base64) until it starts, so a restarted server can run it."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,              -- submission order
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,              -- queued, running, done, failed, cancelled
    error TEXT,
    bad_request INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,             -- JSON: the settings as GET shows them (no images)
    payload TEXT,                      -- JSON: the request as received, images included; only while queued
    save INTEGER NOT NULL DEFAULT 1,
    warnings TEXT,                     -- JSON list: what the client was told to know (words never trained on)
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    parameters TEXT NOT NULL,
    record TEXT NOT NULL,
    png BLOB NOT NULL,
    path TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, seq);
"""

TERMINAL = ("done", "failed", "cancelled")


class JobStore:
    """Rows of jobs and their images. ``path`` None keeps the database in memory (nothing survives)."""

    def __init__(self, path: Path | None, max_kept_bytes: int = 256 * 1024 * 1024, max_kept_jobs: int = 10_000):
        self.path, self.max_kept_bytes, self.max_kept_jobs = path, max_kept_bytes, max_kept_jobs
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path is not None else ":memory:", check_same_thread=False,
                                   isolation_level=None)  # autocommit; each write is its own transaction
        self._lock = threading.Lock()
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker's writes
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "warnings" not in columns:  # a store written before jobs had warnings
                self._db.execute("ALTER TABLE jobs ADD COLUMN warnings TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple = ()) -> Any:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    # -- writes
    def insert(self, job, payload: dict[str, Any]) -> None:
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            self._db.execute(
                "INSERT INTO jobs (id, seq, kind, model, status, request, payload, save, warnings, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, seq, job.kind, job.model, job.status, json.dumps(job.request), json.dumps(payload),
                 int(job.save), json.dumps(job.warnings), job.created))

    def started(self, job) -> None:
        """Running now: the received images are no longer needed (a restart fails a running job)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'running', started = ?, payload = NULL WHERE id = ?",
                             (job.started, job.id))

    def finished(self, job) -> None:
        """Terminal: its status, error and images, in one transaction; then forget what is over the bounds."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("UPDATE jobs SET status = ?, error = ?, bad_request = ?, started = ?, finished = ?, "
                                 "payload = NULL WHERE id = ?", (job.status, job.error, int(job.bad_request),
                                                                 job.started, job.finished, job.id))
                self._db.executemany(
                    "INSERT OR REPLACE INTO images (job_id, idx, seed, parameters, record, png, path) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(job.id, i, im.seed, im.parameters, json.dumps(im.record), im.png, im.path)
                     for i, im in enumerate(job.images)])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.prune()

    def fail_interrupted(self) -> int:
        """At start-up: jobs the last process was running did not finish; say so on each. Returns how many."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, payload = NULL, error = 'the server stopped while "
                "this job was running (it was killed or crashed); nothing of it was kept: submit it again' "
                "WHERE status = 'running'", (time.time(),))
            return cur.rowcount

    def prune(self) -> None:
        """Forget the oldest finished jobs while the kept images are over max_kept_bytes, or the finished
        jobs over max_kept_jobs. Files already written to the output folder stay."""
        with self._lock:
            finished = self._db.execute(
                "SELECT j.id, COALESCE(SUM(LENGTH(i.png)), 0) FROM jobs j LEFT JOIN images i ON i.job_id = j.id "
                "WHERE j.status IN ('done', 'failed', 'cancelled') GROUP BY j.id ORDER BY j.seq").fetchall()
            total = sum(size for _, size in finished)
            drop = []
            for job_id, size in finished:
                if total <= self.max_kept_bytes and len(finished) - len(drop) <= self.max_kept_jobs:
                    break
                drop.append(job_id)
                total -= size
            if drop:
                self._db.executemany("DELETE FROM jobs WHERE id = ?", [(d,) for d in drop])

    # -- reads
    def queued(self) -> list[dict[str, Any]]:
        """Queued jobs in submission order, with their payloads (for a restarted server to run)."""
        with self._lock:
            rows = self._db.execute("SELECT id, kind, model, payload, save, created FROM jobs WHERE status = 'queued' "
                                    "ORDER BY seq").fetchall()
        return [{"id": r[0], "kind": r[1], "model": r[2], "payload": json.loads(r[3]) if r[3] else None,
                 "save": bool(r[4]), "created": r[5]} for r in rows]

    def load(self, job_id: str) -> dict[str, Any] | None:
        """A job row with its images, or None."""
        with self._lock:
            row = self._db.execute("SELECT id, kind, model, status, error, bad_request, request, save, created, "
                                   "started, finished, warnings FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            images = self._db.execute("SELECT seed, parameters, record, png, path FROM images WHERE job_id = ? "
                                      "ORDER BY idx", (job_id,)).fetchall()
        keys = ("id", "kind", "model", "status", "error", "bad_request", "request", "save", "created", "started",
                "finished", "warnings")
        out = dict(zip(keys, row, strict=True))
        out["warnings"] = json.loads(out["warnings"]) if out["warnings"] else []
        out["request"], out["bad_request"], out["save"] = json.loads(out["request"]), bool(out["bad_request"]), \
            bool(out["save"])
        out["images"] = [{"seed": s, "parameters": p, "record": json.loads(r), "png": png, "path": path}
                         for s, p, r, png, path in images]
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = dict.fromkeys(("queued", "running", *TERMINAL), 0)
        out.update(dict(rows))
        return out

    def kept_bytes(self) -> int:
        return int(self._one("SELECT COALESCE(SUM(LENGTH(png)), 0) FROM images"))
