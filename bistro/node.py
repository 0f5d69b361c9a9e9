"""What miners and validators share: chain, wallet, own bucket, peers' buckets, data, model, master.

Everything goes through `Chain` and `Store`; this file never touches SQLite, boto3 or the SDK.
"""

from __future__ import annotations

import hashlib
import logging
import time

import torch

from . import protocol
from .chain import open_chain
from .chain.base import Chain, ChainError, Metagraph
from .config import Settings
from .data import Dataset
from .master import Follower, MasterError, Position
from .model import build_model, state_tensors
from .storage import open_store
from .storage.base import StorageError, Store, TooLarge
from .wallet import open_wallet

log = logging.getLogger("bistro.node")


class NotRegistered(Exception):
    """The wallet's hotkey has no uid on the subnet."""


def default_bucket(hotkey: str) -> str:
    """A bucket name (S3 rules: lowercase, 3-63 chars) derived from the hotkey, for local networks."""
    return "bistro-" + hashlib.sha256(hotkey.encode()).hexdigest()[:16]


class Node:
    """One miner or validator process."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.settings = settings
        self.role = role
        self.netuid = settings.chain.netuid
        self.bpw = settings.mechanism.blocks_per_window
        if settings.train.threads:
            torch.set_num_threads(settings.train.threads)
        self.chain: Chain = open_chain(settings)
        self.wallet = open_wallet(settings.wallet)
        self.keypair = self.wallet.hotkey
        self.hotkey: str = self.keypair.ss58_address
        self.bucket = settings.storage.bucket or default_bucket(self.hotkey)
        self.store_root = settings.storage.root or str(settings.home)
        self.store: Store = open_store(self.bucket, settings.storage, root=self.store_root)
        self.commitment = self._own_commitment()
        self._peers: dict[str, Store] = {}
        self.dataset = Dataset.open(settings)
        self.pages = self.dataset.page_settings
        self.device = torch.device(settings.device)
        self.model = build_model(settings.model, seed=settings.model.seed).to(self.device)
        self.params: dict[str, torch.Tensor] = state_tensors(self.model)
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        param_bytes = sum(v.numel() * v.element_size() for v in self.params.values())
        self.follower = Follower(self.netuid, self.shapes, param_bytes)
        self.master: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self.params.items()}
        """θ as published, kept apart from the model's own parameters (which train or hold θ_eval)."""
        self.uid = self._check_registered()

    # --- chain ------------------------------------------------------------------------------------

    def _own_commitment(self) -> str:
        from .storage import bucket_commitment

        if self.settings.storage.backend == "local":
            return self.bucket
        cfg = self.settings.storage
        return bucket_commitment(type(cfg)(**{**cfg.__dict__, "bucket": self.bucket}))

    def _check_registered(self) -> int:
        uid = self.chain.metagraph().uid_of(self.hotkey)
        if uid is None:
            w = self.settings.wallet
            hint = (
                f"bistro register --wallet.name {w.name} --wallet.hotkey {w.hotkey}"
                if self.settings.chain.network == "embedded"
                else f"btcli subnets register --wallet.name {w.name} --wallet.hotkey {w.hotkey} "
                f"--netuid {self.netuid} --subtensor.network {self.settings.chain.network}"
            )
            raise NotRegistered(
                f"hotkey {self.hotkey} is not registered on netuid {self.netuid}: run `{hint}`"
            )
        return uid

    def ensure_commitment(self) -> None:
        """Commit our bucket unless the chain already holds it."""
        if self.chain.commitments().get(self.uid) != self.commitment:
            self.chain.commit(self.wallet, self.commitment)
            log.info("committed bucket %s", self.commitment)

    def window(self) -> int:
        return protocol.window_of(self.chain.block(), self.bpw)

    def wait_for_block(self, block: int, stop=None) -> bool:
        """Sleep until the chain reaches `block`; False if `stop()` became true first."""
        block_time = getattr(self.chain, "block_time", 1.0)
        while True:
            try:
                now = self.chain.block()
            except ChainError as e:
                log.warning("chain: %s", e)
                now = -1
            if now >= block:
                return True
            if stop is not None and stop():
                return False
            time.sleep(min(max(block_time / 4, 0.05), 2.0))

    # --- buckets ----------------------------------------------------------------------------------

    def peer_store(self, commitment: str) -> Store:
        """The store a uid committed (opened once, cached). Raises ValueError for a bad commitment."""
        store = self._peers.get(commitment)
        if store is None:
            store = open_store(commitment, self.settings.storage, root=self.store_root)
            self._peers[commitment] = store
        return store

    def master_source(self, mg: Metagraph) -> tuple[Store, str] | None:
        """The top-stake validator's bucket and hotkey: where the master is published."""
        top = mg.top_validator()
        if top is None:
            return None
        if top == self.hotkey:
            return self.store, top
        commitment = self.chain.commitments().get(mg.uid_of(top))
        if commitment is None:
            return None
        try:
            return self.peer_store(commitment), top
        except ValueError:
            return None

    def sync_master(
        self, params: dict[str, torch.Tensor], have: Position | None, target: int | None, mg: Metagraph
    ) -> Position | None:
        """Catch `params` up to θ_target from the top validator; None if it is not there (yet)."""
        source = self.master_source(mg)
        if source is None:
            log.info("no top validator with a bucket yet")
            return None
        store, signer = source
        try:
            return self.follower.sync(store, signer, params, have, target)
        except MasterError as e:
            log.info("master θ_%s not available: %s", target, e)
            return None
        except (StorageError, TooLarge) as e:  # the publisher's bucket failed us: try again later
            log.warning("master θ_%s not available: %s", target, e)
            return None
