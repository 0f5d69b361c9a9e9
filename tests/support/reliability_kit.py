"""An in-process network for the reliability and security tests.

One embedded chain in a temp dir, real wallets, a top-stake validator whose bucket holds a master
that the test publishes itself (θ the same for every window: update after update that changes
nothing), a second validator (the one under test, a real `Validator`), and miners whose honest
deltas come from the real `Miner` code path (train, compress with error feedback, sign).

Blocks are 10 ms, so every window the tests use is long over: `evaluate(w)` runs at once. The
chain's tempo is so long that no Yuma epoch runs, so incentive stays zero and merge weights are
1/|V|: a window's scores depend only on the master, the valid deltas and the block hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bistro import protocol
from bistro.chain.local import LocalChain
from bistro.config import Settings, build_settings, protocol_settings, replace
from bistro.master import Position, Publisher
from bistro.model import build_model, model_hash, state_tensors
from bistro.node import default_bucket
from bistro.storage import LocalStore
from bistro.wallet import open_wallet

FIRST, LAST = 1, 4
"""Windows whose deltas the tests score; the master θ_w is published for FIRST..LAST + 2."""


@dataclass
class Member:
    name: str
    settings: Settings
    wallet: object
    uid: int
    bucket: str

    @property
    def hotkey(self) -> str:
        return self.wallet.hotkey.ss58_address

    @property
    def keypair(self):
        return self.wallet.hotkey


@dataclass
class World:
    dir: Path
    settings: Settings
    chain: LocalChain
    members: dict[str, Member] = field(default_factory=dict)
    master_hash: str = ""
    produced: dict[str, list[int]] = field(default_factory=dict)
    """Windows whose honest blob each miner has produced, in order (HonestBlobs' history)."""
    blob_miners: dict[str, tuple[object, tuple[int, ...]]] = field(default_factory=dict)
    """HonestBlobs' live miner per name and the windows it has trained."""

    def store(self, name: str) -> LocalStore:
        return LocalStore(self.dir, self.members[name].bucket)

    def key(self, name: str, window: int) -> str:
        return protocol.delta_key(self.settings.chain.netuid, window, self.members[name].hotkey)

    def put(self, name: str, window: int, blob: bytes) -> None:
        """Place `blob` at `name`'s own delta key for `window`."""
        self.store(name).put(self.key(name, window), blob)

    def path(self, name: str, window: int) -> Path:
        return self.dir / "buckets" / self.members[name].bucket / self.key(name, window)

    def set_commitment(self, name: str, commitment: str | None) -> None:
        """Write a commitment straight into the chain file: a real chain holds whatever bytes a
        hotkey committed, so the validator must survive anything here."""
        with sqlite3.connect(self.dir / "chain.sqlite") as db:
            db.execute("UPDATE neurons SET commitment=? WHERE uid=?", (commitment, self.members[name].uid))


def base_settings(tmp: Path, **overrides) -> Settings:
    flags = {
        "dir": str(tmp),
        "chain.network": "embedded",
        "chain.chain_endpoint": str(tmp / "chain.sqlite"),
        "chain.block_time": 0.01,
        "chain.tempo": 10**9,
        "chain.weights_rate_limit": 0,
        "storage.root": str(tmp),
        "wallet.path": str(tmp / "wallets"),
        "train.threads": 1,
        "train.steps_per_window": 4,
        "mechanism.pages_per_window": 2,  # eval page = half of what it trained on: a clear own-page signal
        "train.batch_size": 4,
        "mechanism.max_delta_bytes": 1 << 20,
        "mechanism.ma_alpha": 0.5,
        "mechanism.eval_pages": 1,
        "mechanism.global_pages": 1,
        # one window is a whole scenario here: a uid is paid from its first scored window
        "mechanism.consistent_windows": 1,
        **overrides,
    }
    return build_settings("tiny", None, flags)


def make_world(tmp: Path, miners: list[str], *, publish: bool = True, **overrides) -> World:
    """Chain, wallets, registrations, stake, commitments and the published master under `tmp`."""
    torch.set_num_threads(1)
    settings = base_settings(tmp, **overrides)
    chain = LocalChain(tmp / "chain.sqlite", settings.chain)
    pin_block_hashes(chain)
    world = World(tmp, settings, chain)
    for name in ["top", "val", *miners]:
        s = replace(settings, **{"wallet.name": name, "dir": str(tmp / "nodes" / name)})
        wallet = fixed_wallet(s, name)
        uid = chain.register(wallet)
        bucket = default_bucket(wallet.hotkey.ss58_address)
        chain.commit(wallet, bucket)
        world.members[name] = Member(name, s, wallet, uid, bucket)
    chain.add_stake(world.members["top"].hotkey, 2000.0)
    chain.add_stake(world.members["val"].hotkey, 1000.0)
    if publish:
        publish_master(world)
    return world


def pin_block_hashes(chain: LocalChain, blocks: int = 2000) -> None:
    """Fixed hashes for the first `blocks` blocks in place of the ones the chain would draw at
    random when first asked (its first writer wins): every window's eval and global pages are then
    the same in every run, so a score's sign on a few pages is not a coin flip that turns one CI
    run in ten red."""
    rows = [(b, "0x" + hashlib.sha256(f"bistro-test-block-{b}".encode()).hexdigest()) for b in range(blocks)]
    with sqlite3.connect(chain.path) as db:
        db.executemany("INSERT OR IGNORE INTO block_hashes (block, hash) VALUES (?, ?)", rows)


def fixed_wallet(settings: Settings, name: str):
    """A passwordless wallet whose keys derive from `name`: every world's `a` has the same hotkey,
    so honest blobs trained in one world are valid in the next (HonestBlobs)."""
    from bittensor import Wallet

    seed = lambda part: "0x" + hashlib.sha256(f"bistro-test-{name}-{part}".encode()).hexdigest()  # noqa: E731
    w = Wallet(settings.wallet.name, settings.wallet.hotkey, path=settings.wallet.path)
    w.regenerate_coldkey(seed=seed("cold"), use_password=False, overwrite=True, suppress=True)
    w.regenerate_hotkey(seed=seed("hot"), use_password=False, overwrite=True, suppress=True)
    return open_wallet(settings.wallet)


def initial_params(settings: Settings) -> dict[str, torch.Tensor]:
    model = build_model(settings.model, seed=settings.model.seed)
    return {k: v.detach().clone() for k, v in state_tensors(model).items()}


def publish_master(world: World, signer: Member | None = None, settings: Settings | None = None) -> None:
    """θ_FIRST in full, then no-op updates to θ_{LAST+2}, signed by `signer` (default: top), with
    the protocol settings of `settings` (default: the world's) in LATEST.json."""
    top = world.members["top"]
    signer = signer or top
    params = initial_params(world.settings)
    digest = model_hash(params)
    pub = Publisher(
        world.store("top"),
        signer.keypair,
        world.settings.chain.netuid,
        protocol_settings(settings or world.settings),
    )
    pub.checkpoint(FIRST, params, digest)
    for w in range(FIRST, LAST + 2):
        pub.update(w, None, digest, digest)
    pub.latest(LAST + 2, digest, [FIRST])
    world.master_hash = digest


def make_miner(world: World, name: str):
    from bistro.miner import Miner

    return Miner(world.members[name].settings)


def honest_blob(miner, world: World, window: int) -> bytes:
    """The real miner path for `window`: catch up to θ_window, train, compress with error feedback,
    sign."""
    if not miner.sync(window):
        raise RuntimeError(f"miner cannot sync θ_{window}")
    if miner.position != Position(window, world.master_hash):
        raise RuntimeError(f"miner holds {miner.position}")
    blob, _ = miner.honest(window)
    reach_seed_block(world, window)
    return blob


def reach_seed_block(world: World, window: int) -> None:
    """Wait until `window`'s seed block exists: a test scores the window as soon as its blob is
    there, and on a quick box (or a miner cut short by its deadline) that can be before the chain
    has reached it."""
    m = world.settings.mechanism
    seed = protocol.seed_block(window, m.blocks_per_window, m.upload_grace_blocks)
    while world.chain.block() < seed:
        time.sleep(0.01)


class HonestBlobs:
    """Honest deltas from the real miner path, trained once per test session (conftest's
    `honest_blobs`) and shared by every module: a blob depends only on the hotkey, the uid, the
    master, the training settings and the windows that miner trained before (error feedback and
    optimizer state carry over), so that is its key. A miss replays the miner's whole history in a
    fresh `Miner`, so a blob is the same whether it was trained here or in another module."""

    def __init__(self) -> None:
        self.blobs: dict[tuple, bytes] = {}
        self.trained = 0
        """Blobs trained (the rest were served from the cache)."""

    @staticmethod
    def _key(world: World, name: str, history: tuple[int, ...]) -> tuple:
        s = world.settings
        shape = {k: dataclasses.asdict(getattr(s, k)) for k in ("model", "train", "mechanism", "data")}
        m = world.members[name]
        return (m.hotkey, m.uid, world.master_hash, json.dumps(shape, sort_keys=True), history)

    def get(self, world: World, name: str, window: int) -> bytes:
        """`name`'s honest blob for `window`, its next window in this world."""
        from bistro.miner import Miner

        history = (*world.produced.get(name, []), window)
        key = self._key(world, name, history)
        if key not in self.blobs:
            miner, done = world.blob_miners.get(name, (None, ()))
            if miner is None or done != history[:-1]:  # replay from scratch, in a state dir of its own
                fresh = replace(
                    world.members[name].settings,
                    dir=str(world.dir / "blob-miners" / f"{name}-{len(self.blobs)}"),
                )
                miner, done = Miner(fresh), ()
            for i in range(len(done), len(history)):
                miner.step_seconds = None  # full steps: the windows are long over, no deadline to fit
                self.blobs.setdefault(
                    self._key(world, name, history[: i + 1]), honest_blob(miner, world, history[i])
                )
                self.trained += 1
            world.blob_miners[name] = (miner, history)
        world.produced[name] = list(history)
        reach_seed_block(world, window)  # a cached blob comes at once
        return self.blobs[key]
