"""`bistro doctor`: what an operator checks before starting a miner or validator, each with its fix.

Checks, in order (a check whose inputs failed is reported as not run, and counts as a failure):
1. wallet files: the coldkey's public file and the hotkey, readable without a password prompt.
2. chain: the endpoint answers, its block and block time; the SDK's and the runtime's versions.
3. registration: the hotkey has a uid on the subnet.
4. validator (`--role validator`): a validator permit and stake.
5. commitment: what the chain holds for our uid is the bucket this node would commit (`--bucket`).
6. bucket writable: a probe object put, read back and deleted with our own credentials.
7. bucket readable anonymously: the probe read back without credentials, as validators read it.
8. disk: free space under `--dir` for the preset's state files.
Exit code 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chain.base import Chain, ChainError, Metagraph
from .config import Settings
from .storage.base import NotFound, StorageError, TooLarge

STORE_ERRORS = (StorageError, NotFound, TooLarge, TimeoutError)

STATE_COPIES = 8
"""fp32 copies of the parameters a node keeps on disk at most: θ and a checkpoint or two, optimizer
moments (2), error-feedback residual, update and temporary files while writing."""
DATA_MARGIN = 1 << 30
"""Bytes for tokenized pages, logs and the embedded chain."""


@dataclass
class Check:
    """One line of the report: what was checked, what was found, and how to fix a failure."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _network(settings: Settings) -> str:
    cfg = settings.chain
    return cfg.chain_endpoint if cfg.chain_endpoint.startswith(("ws://", "wss://")) else cfg.network


class Doctor:
    """Runs the checks for one node's settings; `chain` may be given (tests, or a shared one)."""

    def __init__(self, settings: Settings, role: str = "miner", chain: Chain | None = None) -> None:
        self.settings = settings
        self.role = role
        self.chain = chain
        self.wallet: Any = None
        self.mg: Metagraph | None = None
        self.uid: int | None = None
        self.probe: tuple[Any, str] | None = None

    def run(self) -> list[Check]:
        steps: list[tuple[str, Callable[[], Check], Callable[[], bool]]] = [
            ("wallet", self.check_wallet, lambda: True),
            ("chain", self.check_chain, lambda: True),
            ("versions", self.check_versions, lambda: self.chain is not None),
            (
                "registration",
                self.check_registration,
                lambda: self.wallet is not None and self.mg is not None,
            ),
            ("validator", self.check_validator, lambda: self.uid is not None),
            ("commitment", self.check_commitment, lambda: self.uid is not None),
            ("bucket writable", self.check_writable, lambda: self.wallet is not None),
            ("bucket public read", self.check_anonymous_read, lambda: self.probe is not None),
            ("disk", self.check_disk, lambda: True),
        ]
        out = []
        for name, check, ready in steps:
            if ready():
                out.append(check())
            else:
                out.append(Check(name, False, "not run: an earlier check failed", "fix the failures above"))
        if self.probe is not None:
            store, key = self.probe
            try:
                store.delete(key)
            except STORE_ERRORS:
                pass  # a probe left behind is harmless; the miner's cleanup does not list it
        return out

    # --- 1. wallet --------------------------------------------------------------------------------

    def check_wallet(self) -> Check:
        from .wallet import WalletError, open_wallet

        w = self.settings.wallet
        coldpub = Path(w.path).expanduser() / w.name / "coldkeypub.txt"
        try:
            self.wallet = open_wallet(w)
        except WalletError as e:
            return Check("wallet", False, str(e), self._wallet_fix())
        if not coldpub.is_file():
            self.wallet = None
            return Check("wallet", False, f"no {coldpub}", self._wallet_fix())
        return Check("wallet", True, f"{w.name}/{w.hotkey}: hotkey {self.wallet.hotkey.ss58_address}")

    def _wallet_fix(self) -> str:
        w = self.settings.wallet
        if self.settings.chain.embedded:
            return f"bistro register --wallet.name {w.name} --wallet.hotkey {w.hotkey} --wallet.path {w.path}"
        return (
            f"btcli wallet new_coldkey --wallet.name {w.name} --wallet.path {w.path}, then "
            f"btcli wallet new_hotkey --wallet.name {w.name} --wallet.hotkey {w.hotkey}"
        )

    # --- 2. chain ---------------------------------------------------------------------------------

    def check_chain(self) -> Check:
        cfg = self.settings.chain
        if self.chain is None:
            if cfg.embedded:
                path = Path(cfg.chain_endpoint or self.settings.home / "chain.sqlite").expanduser()
                if not path.is_file():  # opening would create an empty chain: say so instead
                    return Check(
                        "chain", False, f"no embedded chain at {path}",
                        "start a local network (bistro localnet) or register (bistro register), "
                        "or point --subtensor.chain_endpoint at the chain file",
                    )  # fmt: skip
            from .chain import open_chain

            try:
                self.chain = open_chain(self.settings, retry=False)
            except ChainError as e:
                return Check("chain", False, str(e), self._chain_fix())
        try:
            block, block_time = self.chain.block(), float(self.chain.block_time)
            self.mg = self.chain.metagraph()
        except ChainError as e:
            return Check("chain", False, f"{_network(self.settings)}: {e}", self._chain_fix())
        return Check(
            "chain", True,
            f"{_network(self.settings)} at block {block}, {block_time:g} s a block, "
            f"netuid {self.mg.netuid} has {self.mg.n} uids",
        )  # fmt: skip

    def _chain_fix(self) -> str:
        if self.settings.chain.embedded:
            return "check --subtensor.chain_endpoint (the SQLite file) and that no process holds it locked"
        return (
            "check the endpoint (--subtensor.network finney|test or --subtensor.chain_endpoint "
            f"ws://…) and --netuid {self.settings.chain.netuid}; a public endpoint may rate-limit you"
        )

    def check_versions(self) -> Check:
        sdk = importlib.metadata.version("bittensor")
        versions = getattr(self.chain, "versions", None)
        inner = getattr(self.chain, "inner", None)  # a RetryingChain
        if versions is None and inner is not None:
            versions = getattr(inner, "versions", None)
        if versions is None:
            return Check("versions", True, f"bittensor SDK {sdk}; embedded chain (no runtime)")
        try:
            v = versions()
        except ChainError as e:
            return Check("versions", False, str(e), self._chain_fix())
        return Check("versions", True, f"bittensor SDK {v['sdk']}; runtime spec_version {v['spec_version']}")

    # --- 3-4. registration and permit -------------------------------------------------------------

    def check_registration(self) -> Check:
        from .chain.commands import btcli_register_line

        hotkey = self.wallet.hotkey.ss58_address
        self.uid = self.mg.uid_of(hotkey)
        if self.uid is None:
            w = self.settings.wallet
            fix = (
                f"bistro register --wallet.name {w.name} --wallet.hotkey {w.hotkey}"
                if self.settings.chain.embedded
                else btcli_register_line(self.settings)
            )
            return Check("registration", False, f"hotkey {hotkey} has no uid on netuid {self.mg.netuid}", fix)
        return Check("registration", True, f"uid {self.uid} on netuid {self.mg.netuid}")

    def check_validator(self) -> Check:
        k = int((self.mg.uids == self.uid).nonzero()[0][0])
        stake, permit = float(self.mg.S[k]), bool(self.mg.validator_permit[k])
        detail = f"stake {stake:g}, validator permit {'yes' if permit else 'no'}"
        if self.role != "validator":
            return Check("validator", True, f"{detail} (a miner needs neither)")
        if permit and stake > 0:
            return Check("validator", True, detail)
        hotkey = self.wallet.hotkey.ss58_address
        fix = (
            f"bistro register --wallet.name {self.settings.wallet.name} --stake 1000"
            if self.settings.chain.embedded
            else f"btcli stake add --include-hotkeys {hotkey} --netuid {self.mg.netuid} "
            f"--subtensor.network {_network(self.settings)} (permits go to the top stakes each epoch)"
        )
        return Check("validator", False, detail, fix)

    # --- 5. commitment ----------------------------------------------------------------------------

    def own_commitment(self) -> str:
        """What this node commits for its bucket (as `Node` does)."""
        from .node import default_bucket
        from .storage import bucket_commitment

        cfg = self.settings.storage
        bucket = cfg.bucket or default_bucket(self.wallet.hotkey.ss58_address)
        if cfg.backend == "local":
            return bucket
        return bucket_commitment(type(cfg)(**{**cfg.__dict__, "bucket": bucket}))

    def check_commitment(self) -> Check:
        try:
            want = self.own_commitment()
        except ValueError as e:
            return Check("commitment", False, f"--bucket: {e}", "give --bucket a valid S3 bucket name or URL")
        try:
            have = self.chain.commitments().get(self.uid)
        except ChainError as e:
            return Check("commitment", False, str(e), self._chain_fix())
        if have == want:
            return Check("commitment", True, f"the chain holds {want!r}")
        if have is None:
            return Check(
                "commitment", False, f"nothing committed for uid {self.uid}",
                f"the node commits {want!r} when it starts; validators cannot find your deltas before",
            )  # fmt: skip
        return Check(
            "commitment", False, f"the chain holds {have!r}, this node would use {want!r}",
            f"start with --bucket matching {have!r}, or let the node commit {want!r} (it does at start; "
            "mind the chain's commitment rate limit)",
        )  # fmt: skip

    # --- 6-7. bucket ------------------------------------------------------------------------------

    def _own_store(self):
        from .storage import open_store

        root = self.settings.storage.root or str(self.settings.home)
        return open_store(self.own_commitment(), self.settings.storage, root=root)

    def check_writable(self) -> Check:
        try:
            store = self._own_store()
        except ValueError as e:
            return Check("bucket writable", False, f"--bucket: {e}", "give --bucket a valid bucket")
        key = f"bistro/{self.settings.chain.netuid}/doctor/{uuid.uuid4().hex}.probe"
        body = b"bistro doctor probe " + key.encode()
        try:
            store.put(key, body)
            self.probe = (store, key)
            back = store.get(key, max_bytes=4096)
        except STORE_ERRORS as e:
            return Check("bucket writable", False, f"{store!r}: {e}", self._storage_fix())
        if back != body:
            return Check("bucket writable", False, f"{store!r}: read back other bytes", self._storage_fix())
        return Check("bucket writable", True, f"{store!r}: put, get and delete work with our keys")

    def _storage_fix(self) -> str:
        if self.settings.storage.backend == "local":
            return f"make {self.settings.storage.root or self.settings.home} writable by this user"
        return (
            "create the bucket, and give these credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "an R2 API token) s3:PutObject, s3:GetObject, s3:DeleteObject on it; for R2 or MinIO set "
            "--s3.endpoint_url"
        )

    def check_anonymous_read(self) -> Check:
        store, key = self.probe
        body = b"bistro doctor probe " + key.encode()
        try:
            reader = self._anonymous_reader()
            back = reader.get(key, max_bytes=4096)
        except (*STORE_ERRORS, ValueError) as e:
            return Check("bucket public read", False, f"without credentials: {e}", self._public_fix())
        if back != body:
            return Check("bucket public read", False, "without credentials: other bytes", self._public_fix())
        return Check("bucket public read", True, f"{reader!r}: validators can read it without keys")

    def _anonymous_reader(self):
        """Our bucket opened from our commitment the way another node opens it: the peer-read path,
        without our keys, under the address rules of this network."""
        from .storage import open_peer_store, private_allowed

        root = self.settings.storage.root or str(self.settings.home)
        allow = private_allowed(self.settings)
        return open_peer_store(self.own_commitment(), self.settings.storage, root=root, allow_private=allow)

    def _public_fix(self) -> str:
        from .storage.s3 import public_read_policy

        return (
            "AWS: allow public reads with this bucket policy (aws s3api put-bucket-policy --bucket B "
            f"--policy file://policy.json): {public_read_policy('B', listing=False)}; R2: its S3 API "
            "refuses unsigned reads: publish an r2.dev or custom-domain URL, or a read-only token "
            "(see the README)"
        )

    # --- 8. disk ----------------------------------------------------------------------------------

    def check_disk(self) -> Check:
        need = STATE_COPIES * 4 * parameter_count(self.settings) + DATA_MARGIN
        where = self.settings.home
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        detail = f"{free / 2**30:.1f} GiB free under {where}, preset {self.settings.preset} needs ~{need / 2**30:.1f} GiB"
        if free >= need:
            return Check("disk", True, detail)
        return Check("disk", False, detail, "free space there, or point --dir at a larger disk")


def parameter_count(settings: Settings) -> int:
    """Parameters of the preset's model, counted on the meta device (nothing allocated)."""
    import torch

    from .model import build_model

    with torch.device("meta"):
        model = build_model(settings.model, seed=0)
    return sum(p.numel() for p in model.parameters())


def report(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{' ok ' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"       fix: {c.fix}")
    failed = sum(not c.ok for c in checks)
    lines.append("all checks passed" if not failed else f"{failed} check(s) failed")
    return "\n".join(lines)


def main(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Run every check for this node's settings and print the report; 1 if any failed."""
    role = getattr(args, "role", "miner") or "miner"
    checks = Doctor(settings, role).run()
    print(report(checks))
    return 0 if all(c.ok for c in checks) else 1
