"""What miners and validators share: chain, wallet, own bucket, peers' buckets, data, model, master.

Everything goes through `Chain` and `Store`; this file never touches SQLite, boto3 or the SDK.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import protocol, sample
from .chain import open_chain
from .chain.base import Chain, ChainError, Metagraph
from .config import Settings, protocol_settings
from .data import Dataset
from .manifest import PublisherTampered
from .master import Follower, MasterError, Position, ProtocolMismatch
from .metrics import Metrics
from .model import build_model, state_tensors
from .storage import open_peer_store, open_store, private_allowed
from .storage.base import StorageError, Store, TooLarge
from .wallet import open_wallet

log = logging.getLogger("bistro.node")

MAX_PEER_STORES = 512
"""Peer stores kept open (keyed by commitments, which miners choose): least recently used go first."""
MAX_PUBLISHERS = 64
"""Windows whose publisher we remember."""


def install_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (the node finishes its window, then exits); a second one
    interrupts at once."""

    def handler(signum, frame) -> None:  # noqa: ARG001
        log.info("signal %d: finishing the current window, then stopping", signum)
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


MAX_CHAIN_BACKOFF = 300.0
"""Seconds between two tries at most while the chain keeps failing."""


def chain_backoff(failures: int, block_time: float) -> float:
    """Seconds to wait after `failures` chain failures in a row: a block, doubling, capped."""
    return min(MAX_CHAIN_BACKOFF, max(block_time, 0.05) * 2 ** max(failures - 1, 0))


def pause(seconds: float, stop=None) -> bool:
    """Sleep `seconds`, checking `stop()` at least every second; False if it became true."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if stop is not None and stop():
            return False
        time.sleep(min(left, 1.0))
    return stop is None or not stop()


def staked_publisher(chain: Chain, window: int, bpw: int) -> str | None:
    """The top-stake validator at the first block of `window`: it publishes update-{window}
    (θ_{window+1}), and every node that asks gets the same answer. None before any validator had
    stake there."""
    return chain.top_validator_at(max(protocol.window_start(window, bpw), 0))


def publisher_at(chain: Chain, window: int, bpw: int, mg: Metagraph | None = None) -> str | None:
    """The publisher of update-{window}: `staked_publisher`, else the top validator now (`mg`, or the
    chain's metagraph): the network's first publisher."""
    hotkey = staked_publisher(chain, window, bpw)
    return hotkey if hotkey is not None else (mg or chain.metagraph()).top_validator()


class NotRegistered(Exception):
    """The wallet's hotkey has no uid on the subnet."""


def default_bucket(hotkey: str) -> str:
    """A bucket name (S3 rules: lowercase, 3-63 chars) derived from the hotkey, for local networks."""
    return "bistro-" + hashlib.sha256(hotkey.encode()).hexdigest()[:16]


class Node:
    """One miner or validator process."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.stopping = threading.Event()
        """Set by a signal (`install_signals`): the node finishes its window, then stops."""
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
        self._peers: OrderedDict[str, Store] = OrderedDict()
        self._publishers: OrderedDict[int, str] = OrderedDict()
        self.dataset = Dataset.open(settings, index_source=self._hub_index_source())
        self.pages = self.dataset.page_settings
        self.device = torch.device(settings.device)
        self.model = build_model(settings.model, seed=settings.model.seed).to(self.device)
        self.params: dict[str, torch.Tensor] = state_tensors(self.model)
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        param_bytes = sum(v.numel() * v.element_size() for v in self.params.values())
        self.protocol = protocol_settings(settings)
        self.follower = Follower(self.netuid, self.shapes, param_bytes, self.protocol)
        self.follower.own = self.hotkey  # a validator reads its own LATEST.json too
        self.follower.require_manifest = True  # every accepted update names what it merged
        self.follower.sample_of = self._recent_sample
        self.master: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self.params.items()}
        """θ as published, kept apart from the model's own parameters (which train or hold θ_eval)."""
        self.uid = self._check_registered()
        self.metrics = Metrics(settings, role, self.uid, self.hotkey)
        self.metrics.window_length(self.bpw * self.block_time())
        """Prometheus endpoint / W&B run (both off by default), fed once per window."""

    def _hub_index_source(self):  # noqa: ANN202 - a data.hub.IndexSource or None
        """`hf:` corpora: the publisher's signed copy of the row-group index (data/hub.py)."""
        if not self.settings.data.corpus.startswith("hf:"):
            return None
        from .data.hub import fetch_index

        try:
            source = self.master_source(self.window(), self.chain.metagraph())
        except ChainError:
            return None
        return None if source is None else fetch_index(*source, self.netuid, self.settings.data.corpus)

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
                if self.settings.chain.embedded
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

    def block_time(self) -> float:
        """Seconds per block as the chain reports it (12 s if the chain cannot say right now)."""
        try:
            return float(self.chain.block_time)
        except ChainError as e:
            log.warning("chain: block time unknown (%s): assuming 12 s", e)
            return 12.0

    def wait_for_block(self, block: int, stop=None) -> bool:
        """Sleep until the chain reaches `block`; False if `stop()` became true first.

        Polite to a public endpoint: one request, then sleep until the block is due by the chain's
        block time, then about three requests a block. A failing chain is asked again after a
        block, then after twice as long each time, at most every `MAX_CHAIN_BACKOFF` seconds.
        """
        block_time = self.block_time()
        failures = 0
        while True:
            try:
                now = self.chain.block()
                failures = 0
            except ChainError as e:
                failures += 1
                wait = chain_backoff(failures, block_time)
                log.warning("chain: %s (asking again in %.1fs)", e, wait)
                if not pause(wait, stop):
                    return False
                continue
            if now >= block:
                return True
            if stop is not None and stop():
                return False
            if not pause(max((block - now - 1) * block_time, block_time / 3), stop):
                return False

    def run_windows(
        self,
        first: Callable[[], int],
        max_windows: int,
        *,
        due: Callable[[int], int],
        newest: Callable[[int], int],
        step: Callable[[int], None],
        on_bug: str | None = None,
        unfinished: str = "skipped",
    ) -> int:
        """The node's loop, the same for every role: commit our bucket, then for each window from
        `first()`: wait for block `due(w)`; if the chain's window says a later one is the newest we
        can still do (`newest(current window)`), join it; `step(w)`. A ChainError tries the same
        window again after a backoff (the join skips it once it is over), logged as `unfinished`. `on_bug`: a message to log
        an exception of ours with, skipping the window and going on; None lets it end the node.
        Stops at `self.stopping` or after `max_windows` (0: never); returns the windows done."""
        stop = self.stopping.is_set
        self.keep_trying("commit", self.ensure_commitment, stop)
        window, done, failures = first(), 0, 0
        while not stop() and (max_windows == 0 or done < max_windows):
            if not self.wait_for_block(due(window), stop):
                break
            try:
                latest = newest(self.window())
                if latest > window:
                    log.warning(
                        "behind: windows %d..%d already over: joining window %d", window, latest - 1, latest
                    )
                    window = latest
                step(window)
                failures = 0
            except ProtocolMismatch:
                raise  # a setting to change, not a window to wait out: the node stops
            except ChainError as e:  # the endpoint is down or the runtime changed: carry on later
                failures += 1
                log.warning("window %d: %s: chain failed (%s)", window, unfinished, e)
                self.retry_chain(f"window {window}", e, failures, stop)
                continue
            except Exception:
                if on_bug is None:
                    raise
                log.exception("window %d: %s", window, on_bug)  # loud; the next window goes on
            done += 1
            window += 1
        return done

    def keep_trying(self, what: str, fn, stop=None) -> bool:
        """`fn()` until it gets through the chain (backoff between tries); False if stopped first."""
        failures = 0
        while stop is None or not stop():
            try:
                fn()
                return True
            except ChainError as e:
                failures += 1
                self.retry_chain(what, e, failures, stop)
        return False

    def retry_chain(self, what: str, error: ChainError, failures: int, stop=None) -> bool:
        """Log a chain failure of `what` and sleep its backoff; False if `stop()` became true."""
        wait = chain_backoff(failures, self.block_time())
        log.warning("%s: chain failed (%s): retrying in %.1fs", what, error, wait)
        return pause(wait, stop)

    # --- buckets ----------------------------------------------------------------------------------

    def peer_store(self, commitment: str) -> Store:
        """The store a uid committed, read-only and read without our credentials (opened once,
        cached, at most MAX_PEER_STORES of them). Raises BadCommitment (a ValueError)."""
        store = self._peers.get(commitment)
        if store is None:
            store = open_peer_store(
                commitment, self.settings.storage, root=self.store_root,
                allow_private=private_allowed(self.settings),
            )  # fmt: skip
            self._peers[commitment] = store
            while len(self._peers) > MAX_PEER_STORES:
                self._peers.popitem(last=False)
        self._peers.move_to_end(commitment)
        return store

    def publisher_of(self, window: int, mg: Metagraph) -> str | None:
        """`publisher_at` for `window`, remembered once the chain has a validator with stake there
        (`mg`: the metagraph this window already read, for the first publisher)."""
        known = self._publishers.get(window)
        if known is not None:
            return known
        hotkey = staked_publisher(self.chain, window, self.bpw)
        if hotkey is None:
            return publisher_at(self.chain, window, self.bpw, mg)
        self._publishers[window] = hotkey
        while len(self._publishers) > MAX_PUBLISHERS:
            self._publishers.popitem(last=False)
        return hotkey

    def bucket_of(self, hotkey: str, mg: Metagraph) -> Store | None:
        """The bucket `hotkey` committed (our own store for our own hotkey), None if it has none."""
        if hotkey == self.hotkey:
            return self.store
        commitment = self.chain.commitments().get(mg.uid_of(hotkey))
        if commitment is None:
            return None
        try:
            return self.peer_store(commitment)
        except ValueError:
            return None

    def master_source(self, window: int, mg: Metagraph) -> tuple[Store, str] | None:
        """Where θ_window is published: the bucket and hotkey of the publisher of window - 1."""
        signer = self.publisher_of(window - 1, mg)
        if signer is None:
            return None
        store = self.bucket_of(signer, mg)
        return None if store is None else (store, signer)

    def _recent_sample(self, window: int) -> set[int] | None:
        """The drawn sample of a recent `window` (bistro/sample.py, from the chain's seed hashes),
        for the manifest's cheap check; None (not checked) for an old window, whose registered uids
        may have changed since, or when the chain cannot say."""
        if window < self.window() - 2:
            return None
        try:
            uids = [int(u) for u in self.chain.metagraph().uids]
            limit = self.settings.mechanism.max_uids_per_window
            if len(uids) <= limit:
                return set(uids)
            grace = self.settings.mechanism.upload_grace_blocks
            hashes = sample.sample_hashes(
                window, lambda w: self.chain.block_hash(protocol.seed_block(w, self.bpw, grace))
            )
            return set(sample.scored_sample(self.netuid, window, hashes, uids, limit))
        except ChainError:
            return None

    def sync_master(
        self, params: dict[str, torch.Tensor], have: Position | None, target: int | None, mg: Metagraph
    ) -> Position | None:
        """Catch `params` up to θ_target from its publisher; None if it is not there (yet)."""
        window = target if target is not None else self.window()
        source = self.master_source(window, mg)
        if source is None:
            log.info("no publisher with a bucket for θ_%d yet", window)
            return None
        store, signer = source
        try:
            return self.follower.sync(store, signer, params, have, target)
        except MasterError as e:
            log.info("master θ_%s not available: %s", target, e)
            return None
        except ProtocolMismatch:
            raise
        except PublisherTampered as e:  # not a wait: this publisher's master is not followed
            log.error("NOT FOLLOWING %s…: %s (until another validator publishes)", signer[:10], e.reason)
            return None
        except (StorageError, TooLarge, TimeoutError) as e:  # the publisher's bucket failed us: later
            log.warning("master θ_%s not available: %s", target, e)
            return None
        except Exception:  # noqa: BLE001 -- the publisher is a peer too: a bug of ours on its bytes is loud, not fatal
            log.exception("following θ_%s from %s… failed", target, signer[:10])
            return None
