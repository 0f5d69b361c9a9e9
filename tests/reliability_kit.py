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

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bistro import protocol
from bistro.chain.local import LocalChain
from bistro.config import Settings, build_settings, replace
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
        "train.steps_per_window": 2,
        "train.batch_size": 4,
        "mechanism.max_delta_bytes": 1 << 20,
        "mechanism.ma_alpha": 0.5,
        "mechanism.eval_pages": 1,
        "mechanism.global_pages": 1,
        **overrides,
    }
    return build_settings("tiny", None, flags)


def make_world(tmp: Path, miners: list[str], *, publish: bool = True, **overrides) -> World:
    """Chain, wallets, registrations, stake, commitments and the published master under `tmp`."""
    torch.set_num_threads(1)
    settings = base_settings(tmp, **overrides)
    chain = LocalChain(tmp / "chain.sqlite", settings.chain)
    world = World(tmp, settings, chain)
    for name in ["top", "val", *miners]:
        s = replace(settings, **{"wallet.name": name, "dir": str(tmp / "nodes" / name)})
        wallet = open_wallet(s.wallet, create=True)
        uid = chain.register(wallet)
        bucket = default_bucket(wallet.hotkey.ss58_address)
        chain.commit(wallet, bucket)
        world.members[name] = Member(name, s, wallet, uid, bucket)
    chain.add_stake(world.members["top"].hotkey, 2000.0)
    chain.add_stake(world.members["val"].hotkey, 1000.0)
    if publish:
        publish_master(world)
    return world


def initial_params(settings: Settings) -> dict[str, torch.Tensor]:
    model = build_model(settings.model, seed=settings.model.seed)
    return {k: v.detach().clone() for k, v in state_tensors(model).items()}


def publish_master(world: World, signer: Member | None = None) -> None:
    """θ_FIRST in full, then no-op updates to θ_{LAST+2}, signed by `signer` (default: top)."""
    top = world.members["top"]
    signer = signer or top
    params = initial_params(world.settings)
    digest = model_hash(params)
    pub = Publisher(world.store("top"), signer.keypair, world.settings.chain.netuid)
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
    return blob
