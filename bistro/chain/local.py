"""The embedded chain: one SQLite file that every process of a local network shares.

What it imitates from Bittensor, and how:
- Blocks come from the wall clock: `block = floor((now - genesis) / block_time)`. Genesis, block time
  and the subnet's parameters are written into the file when it is created; every later opener
  takes them from there, so all processes of one network agree on the block.
- `block_hash(b)` is 32 random bytes, drawn by whichever process first asks for block b once it
  has been reached, and stored in the same write transaction: every process gets the same hash,
  and nobody (not even a reader of the file) can know it before the block exists.
- Registration of hotkeys into uid slots; when all `max_uids` slots are taken, the uid with the
  lowest emission (incentive + dividends: Bittensor's pruning score, so validators, whose
  incentive is zero, are not pruned first) that is past its immunity period is replaced (ties:
  the earliest registered, then the lowest uid). A replaced uid loses its commitment, its weights (set by it and to it) and
  its bonds.
- Validator permits: the `max_validators` registered hotkeys with the most stake (stake > 0; ties:
  lowest uid), computed from the current stake.
- `set_weights` as the chain checks it, quantised to u16 by max-upscaling to 65535.
- Yuma consensus (`yuma.py`), with subtensor's `activity_cutoff`, at every block that is a multiple of `tempo`, run lazily by whichever
  process first reads or writes after that block, in block order, inside one write transaction,
  so every process sees the same results.

Concurrency: WAL mode, `BEGIN IMMEDIATE` for every write, a busy timeout, short transactions. A
process killed mid-write leaves the file as it was before that transaction (SQLite's atomic commit).
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..config import ChainConfig
from .base import Chain, ChainError, Metagraph
from .yuma import active_mask, yuma_epoch

MAX_COMMITMENT_BYTES = 128
U16_MAX = 65535
MAX_CATCHUP_EPOCHS = 200
"""Epochs replayed at most when nobody touched the chain for a long time (bonds have converged)."""

# Parameters fixed at creation; later openers read these from the file, not from their settings.
_PARAMS = (
    "block_time",
    "tempo",
    "netuid",
    "weights_rate_limit",
    "max_uids",
    "immunity_period",
    "max_validators",
    "activity_cutoff",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS neurons (
    uid INTEGER PRIMARY KEY,
    hotkey TEXT NOT NULL UNIQUE,
    registered_at INTEGER NOT NULL,
    last_update INTEGER,
    incentive REAL NOT NULL DEFAULT 0,
    dividends REAL NOT NULL DEFAULT 0,
    consensus REAL NOT NULL DEFAULT 0,
    validator_trust REAL NOT NULL DEFAULT 0,
    commitment TEXT
);
CREATE TABLE IF NOT EXISTS stakes (hotkey TEXT PRIMARY KEY, amount REAL NOT NULL);
CREATE TABLE IF NOT EXISTS stake_log (block INTEGER NOT NULL, hotkey TEXT NOT NULL, amount REAL NOT NULL);
CREATE TABLE IF NOT EXISTS weights (
    src INTEGER NOT NULL, dst INTEGER NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (src, dst)
);
CREATE TABLE IF NOT EXISTS bonds (
    src INTEGER NOT NULL, dst INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (src, dst)
);
CREATE TABLE IF NOT EXISTS block_hashes (block INTEGER PRIMARY KEY, hash TEXT NOT NULL);
"""


T = TypeVar("T")


def _is_busy(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


def _hotkey(wallet: Any) -> str:
    return wallet.hotkey.ss58_address


def quantize_u16(weights: np.ndarray) -> np.ndarray:
    """Scale so the largest weight is 65535 and round, as subtensor stores weights."""
    top = float(weights.max()) if len(weights) else 0.0
    if top <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    return np.round(weights / top * U16_MAX).astype(np.int64)


class LocalChain(Chain):
    """One subnet in one SQLite file. Safe to open from many processes at once."""

    def __init__(self, path: str | Path, cfg: ChainConfig, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # re-entered by _catch_up inside a guarded call
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self.busy_timeout = busy_timeout
        # Opening races with other processes creating or writing the same file: the journal-mode
        # switch takes an exclusive lock that SQLite's busy timeout does not always wait for, so
        # every step of opening waits out SQLITE_BUSY itself.
        self._busy_retry(self._set_pragmas)
        self._busy_retry(lambda: self._create(cfg))
        meta = self._busy_retry(lambda: dict(self._db.execute("SELECT key, value FROM meta").fetchall()))
        self.chain_id: str = meta["chain_id"]
        self.genesis = float(meta["genesis"])
        self.block_time = float(meta["block_time"])
        self.tempo = int(meta["tempo"])
        self.netuid = int(meta["netuid"])
        self.weights_rate_limit = int(meta["weights_rate_limit"])
        self.max_uids = int(meta["max_uids"])
        self.immunity_period = int(meta["immunity_period"])
        self.max_validators = int(meta["max_validators"])
        # files made before activity_cutoff existed get it from their first newer opener (_create)
        self.activity_cutoff = int(meta.get("activity_cutoff", cfg.activity_cutoff))

    def _busy_retry(self, fn: Callable[[], T]) -> T:
        """`fn()`, retried with backoff while the file is busy or locked, up to `busy_timeout`."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() + pause > deadline:
                    raise ChainError(f"local chain {self.path} is busy: {e}", transient=True) from e
            except ChainError as e:
                if not e.transient or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause * (0.5 + secrets.randbelow(1000) / 1000))
            pause = min(pause * 2, 0.5)

    def _set_pragmas(self) -> None:
        # WAL is a property of the file: only the first opener has to switch it (others read it)
        if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def _create(self, cfg: ChainConfig) -> None:
        values = {name: str(getattr(cfg, name)) for name in _PARAMS}
        values.update(chain_id=secrets.token_hex(16), genesis=repr(time.time()), last_epoch="0")
        with self._write() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)  # not executescript: it would commit our transaction
            db.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", values.items())

    def close(self) -> None:
        self._db.close()

    # --- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn a busy or locked database into a transient ChainError."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise ChainError(f"local chain {self.path} is busy: {e}", transient=True) from e
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; rolled back on any error."""
        with self._lock, self._guard():
            self._busy_retry(lambda: self._db.execute("BEGIN IMMEDIATE"))
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for reads (WAL readers never block writers)."""
        with self._lock, self._guard():
            self._busy_retry(lambda: self._db.execute("BEGIN"))
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    # --- blocks ---------------------------------------------------------------------------------

    def block(self) -> int:
        return max(0, math.floor((time.time() - self.genesis) / self.block_time))

    def block_hash(self, block: int) -> str:
        """The block's hash: drawn at random the first time anyone asks after the block is reached."""
        if block < 0 or block > self.block():
            raise ChainError(f"block {block} does not exist yet (current block {self.block()})")
        with self._read() as db:
            row = db.execute("SELECT hash FROM block_hashes WHERE block=?", (block,)).fetchone()
        if row is not None:
            return str(row[0])
        with self._write() as db:  # the first writer's bytes win; every later reader sees them
            db.execute(
                "INSERT OR IGNORE INTO block_hashes (block, hash) VALUES (?, ?)",
                (block, "0x" + secrets.token_hex(32)),
            )
            return str(db.execute("SELECT hash FROM block_hashes WHERE block=?", (block,)).fetchone()[0])

    def wait_for_block(self, block: int, timeout: float | None = None) -> int:
        """Sleep until the chain reaches `block`; return the current block."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (now := self.block()) < block:
            wait = self.genesis + block * self.block_time - time.time() + 1e-3
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChainError(f"block {block} not reached within {timeout}s (at {now})")
                wait = min(wait, left)
            time.sleep(max(wait, 1e-3))
        return now

    # --- epochs ---------------------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Run every Yuma epoch due before now, if another process has not already."""
        due = self.block() // self.tempo * self.tempo
        last = int(self._db.execute("SELECT value FROM meta WHERE key='last_epoch'").fetchone()[0])
        if due <= last:
            return
        with self._write() as db:
            last = int(db.execute("SELECT value FROM meta WHERE key='last_epoch'").fetchone()[0])
            epochs = list(range(last + self.tempo, due + 1, self.tempo))[-MAX_CATCHUP_EPOCHS:]
            for epoch_block in epochs:
                self._epoch(db, epoch_block)
            db.execute("UPDATE meta SET value=? WHERE key='last_epoch'", (str(due),))

    def _epoch(self, db: sqlite3.Connection, block: int) -> None:
        rows = db.execute(
            "SELECT uid, hotkey, COALESCE(last_update, registered_at) FROM neurons ORDER BY uid"
        ).fetchall()
        if not rows:
            return
        n = max(uid for uid, _, _ in rows) + 1
        S, permit = self._stake_and_permits(db, n)
        last = np.full(n, -(10**12), dtype=np.int64)  # empty slots: never active
        for uid, _, seen in rows:
            last[uid] = seen
        W = np.zeros((n, n))
        for src, dst, value in db.execute("SELECT src, dst, value FROM weights"):
            W[src, dst] = value
        B = np.zeros((n, n))
        for src, dst, value in db.execute("SELECT src, dst, value FROM bonds"):
            B[src, dst] = value
        r = yuma_epoch(
            W, S, B, validator_permit=permit, active=active_mask(last, block, self.activity_cutoff)
        )
        db.executemany(
            "UPDATE neurons SET incentive=?, dividends=?, consensus=?, validator_trust=? WHERE uid=?",
            [
                (
                    float(r.incentive[u]),
                    float(r.dividends[u]),
                    float(r.consensus[u]),
                    float(r.validator_trust[u]),
                    u,
                )
                for u, _, _ in rows
            ],
        )
        db.execute("DELETE FROM bonds")
        src, dst = np.nonzero(r.bonds)
        db.executemany(
            "INSERT INTO bonds (src, dst, value) VALUES (?, ?, ?)",
            [(int(i), int(j), float(r.bonds[i, j])) for i, j in zip(src, dst, strict=True)],
        )

    def _stake_and_permits(self, db: sqlite3.Connection, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Stake per uid slot, and permits for the top `max_validators` by stake (> 0)."""
        S = np.zeros(n)
        for uid, amount in db.execute(
            "SELECT n.uid, COALESCE(s.amount, 0) FROM neurons n LEFT JOIN stakes s ON s.hotkey = n.hotkey"
        ):
            S[uid] = amount
        order = sorted((u for u in range(n) if S[u] > 0), key=lambda u: (-S[u], u))
        permit = np.zeros(n, dtype=bool)
        permit[order[: self.max_validators]] = True
        return S, permit

    # --- reads ----------------------------------------------------------------------------------

    def metagraph(self) -> Metagraph:
        with self._lock, self._guard():
            self._catch_up()
        block = self.block()
        with self._read() as db:
            rows = db.execute(
                "SELECT n.uid, n.hotkey, COALESCE(s.amount, 0), n.incentive, n.dividends, "
                "COALESCE(n.last_update, 0), n.validator_trust "
                "FROM neurons n LEFT JOIN stakes s ON s.hotkey = n.hotkey "
                "ORDER BY n.uid"
            ).fetchall()
            n = rows[-1][0] + 1 if rows else 0
            _, permit = self._stake_and_permits(db, n)
            weights: dict[int, dict[int, float]] = {}
            for src, dst, value in db.execute("SELECT src, dst, value FROM weights ORDER BY src, dst"):
                weights.setdefault(src, {})[dst] = float(value)
        for row in weights.values():
            total = sum(row.values())
            for dst in row:
                row[dst] /= total
        uids = np.array([r[0] for r in rows], dtype=np.int64)
        return Metagraph(
            netuid=self.netuid,
            block=block,
            uids=uids,
            hotkeys=[r[1] for r in rows],
            S=np.array([r[2] for r in rows], dtype=np.float64),
            I=np.array([r[3] for r in rows], dtype=np.float64),
            D=np.array([r[4] for r in rows], dtype=np.float64),
            validator_permit=permit[uids] if n else np.zeros(0, dtype=bool),
            last_update=np.array([r[5] for r in rows], dtype=np.int64),
            weights=weights,
            validator_trust=np.array([r[6] for r in rows], dtype=np.float64),
        )

    def commitments(self) -> dict[int, str]:
        with self._read() as db:
            rows = db.execute("SELECT uid, commitment FROM neurons WHERE commitment IS NOT NULL").fetchall()
        return {int(uid): text for uid, text in rows}

    # --- writes ---------------------------------------------------------------------------------

    def _uid_of(self, db: sqlite3.Connection, hotkey: str, doing: str) -> int:
        row = db.execute("SELECT uid FROM neurons WHERE hotkey=?", (hotkey,)).fetchone()
        if row is None:
            raise ChainError(f"cannot {doing}: hotkey {hotkey} is not registered on netuid {self.netuid}")
        return int(row[0])

    def register(self, wallet: Any) -> int:
        hotkey = _hotkey(wallet)
        with self._lock, self._guard():
            self._catch_up()
        with self._write() as db:
            row = db.execute("SELECT uid FROM neurons WHERE hotkey=?", (hotkey,)).fetchone()
            if row is not None:
                return int(row[0])
            block = self.block()
            count = db.execute("SELECT COUNT(*) FROM neurons").fetchone()[0]
            uid = count if count < self.max_uids else self._prune(db, block)
            db.execute(
                "INSERT INTO neurons (uid, hotkey, registered_at) VALUES (?, ?, ?)", (uid, hotkey, block)
            )
            return uid

    def _prune(self, db: sqlite3.Connection, block: int) -> int:
        """Free the non-immune uid with the lowest incentive + dividends (ties: earliest, lowest uid)."""
        row = db.execute(
            "SELECT uid FROM neurons WHERE registered_at + ? <= ? "
            "ORDER BY incentive + dividends ASC, registered_at ASC, uid ASC LIMIT 1",
            (self.immunity_period, block),
        ).fetchone()
        if row is None:
            raise ChainError(
                f"subnet {self.netuid} is full ({self.max_uids} uids) and every uid is still immune "
                f"({self.immunity_period} blocks after registration): try again later",
                transient=False,
            )
        uid = int(row[0])
        db.execute("DELETE FROM neurons WHERE uid=?", (uid,))
        db.execute("DELETE FROM weights WHERE src=? OR dst=?", (uid, uid))
        db.execute("DELETE FROM bonds WHERE src=? OR dst=?", (uid, uid))
        return uid

    def add_stake(self, hotkey: str, amount: float) -> None:
        """Add stake to a hotkey (registered or not); the local chain has no coldkey balances."""
        if not math.isfinite(amount) or amount <= 0:
            raise ChainError(f"stake amount must be a positive number, not {amount!r}")
        with self._write() as db:
            # a file from before the log: its stakes so far count from genesis
            db.execute(
                "INSERT INTO stake_log (block, hotkey, amount) SELECT 0, hotkey, amount FROM stakes "
                "WHERE NOT EXISTS (SELECT 1 FROM stake_log)"
            )
            db.execute(
                "INSERT INTO stakes (hotkey, amount) VALUES (?, ?) "
                "ON CONFLICT(hotkey) DO UPDATE SET amount = amount + excluded.amount",
                (hotkey, float(amount)),
            )
            # the history `top_validator_at` reads: every node agrees on who was top at a block
            db.execute(
                "INSERT INTO stake_log (block, hotkey, amount) "
                "SELECT ?, hotkey, amount FROM stakes WHERE hotkey = ?",
                (self.block(), hotkey),
            )

    def top_validator_at(self, block: int) -> str | None:
        """The registered hotkey with the most stake (> 0) at `block`, ties to the lowest uid; from
        the stake log (a file written before the log existed: the current stake)."""
        with self._read() as db:
            if db.execute("SELECT 1 FROM stake_log LIMIT 1").fetchone() is None:
                rows = db.execute(
                    "SELECT n.uid, n.hotkey, s.amount FROM neurons n JOIN stakes s ON s.hotkey = n.hotkey"
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT n.uid, n.hotkey, l.amount FROM neurons n JOIN stake_log l ON l.rowid = "
                    "(SELECT MAX(rowid) FROM stake_log WHERE hotkey = n.hotkey AND block <= ?)",
                    (block,),
                ).fetchall()
        ranked = sorted((r for r in rows if r[2] > 0), key=lambda r: (-r[2], r[0]))
        return ranked[0][1] if ranked else None

    def commit(self, wallet: Any, data: str) -> None:
        size = len(data.encode())
        if size > MAX_COMMITMENT_BYTES:
            raise ChainError(f"commitment is {size} bytes; at most {MAX_COMMITMENT_BYTES} are allowed")
        hotkey = _hotkey(wallet)
        with self._write() as db:
            uid = self._uid_of(db, hotkey, "commit")
            db.execute("UPDATE neurons SET commitment=? WHERE uid=?", (data, uid))

    def set_weights(self, wallet: Any, uids: Sequence[int], weights: Sequence[float]) -> None:
        uid_arr, values = check_weights(uids, weights)
        hotkey = _hotkey(wallet)
        with self._lock, self._guard():
            self._catch_up()
        with self._write() as db:
            me = self._uid_of(db, hotkey, "set weights")
            n = db.execute("SELECT MAX(uid) FROM neurons").fetchone()[0] + 1
            _, permit = self._stake_and_permits(db, n)
            if not permit[me]:
                raise ChainError(
                    f"cannot set weights: uid {me} has no validator permit "
                    f"(only the top {self.max_validators} hotkeys by stake, with stake > 0, have one)"
                )
            bad = [int(u) for u in uid_arr if u < 0 or u >= n]
            if bad:
                raise ChainError(f"cannot set weights: uids {bad} do not exist (the subnet has {n} uids)")
            block = self.block()
            last = db.execute("SELECT last_update FROM neurons WHERE uid=?", (me,)).fetchone()[0]
            if last is not None and block - last < self.weights_rate_limit:
                wait = self.weights_rate_limit - (block - last)
                raise ChainError(
                    f"cannot set weights: rate limited; uid {me} set weights at block {last}, "
                    f"wait {wait} more block(s) (weights_rate_limit={self.weights_rate_limit})"
                )
            q = quantize_u16(values)
            db.execute("DELETE FROM weights WHERE src=?", (me,))
            db.executemany(
                "INSERT INTO weights (src, dst, value) VALUES (?, ?, ?)",
                [(me, int(u), int(v)) for u, v in zip(uid_arr, q, strict=True) if v > 0],
            )
            db.execute("UPDATE neurons SET last_update=? WHERE uid=?", (block, me))


def check_weights(uids: Sequence[int], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Refuse malformed weights (any chain) before anything is written; returns int64 uids, float64 weights."""
    uid_arr = np.asarray(list(uids))
    values = np.asarray(list(weights), dtype=np.float64)
    if uid_arr.ndim != 1 or values.ndim != 1 or len(uid_arr) != len(values):
        raise ChainError(f"cannot set weights: {len(uid_arr)} uids but {len(values)} weights")
    if len(uid_arr) and not np.issubdtype(uid_arr.dtype, np.integer):
        raise ChainError("cannot set weights: uids must be integers")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ChainError(
            "cannot set weights: weights must be finite and non-negative (NaN or negative given)"
        )
    if len(set(uid_arr.tolist())) != len(uid_arr):
        raise ChainError("cannot set weights: duplicate uids")
    return uid_arr.astype(np.int64), values
