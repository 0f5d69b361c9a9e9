"""`bistro miners`: several miners of a local network in one OS process, one thread each.

A local network of 48 miners on a 2-core machine cannot hold 48 Python processes with their own
torch (about 400 MiB each); `bistro localnet --miners-per-process K` starts one `bistro miners`
per K miners instead. Each miner is the same object the one-process commands build (`Miner` for
`honest`, `PersonaMiner` otherwise) with its own settings: its own wallet, uid, bucket, state
directory, data pages, optimizer and error-feedback residual. Each runs its own unchanged window
loop (`Miner.run`) in its own thread, so its timing against the chain (catch-up, steps that fit
before the deadline, a copier waiting for its source) is what it would be alone; torch releases the
GIL inside its kernels, so the threads train side by side as processes would. Training reads no
global random state (`training.Trainer`), so a miner's deltas do not depend on its neighbours.

What the threads share is the process: one signal stops them all (each finishes its window), and a
miner whose loop raises ends the process with code 1, as it would end its own process; its
neighbours stop with it and the network lists the process as crashed. Local networks only: a
production miner is one `bistro miner` process.
"""

from __future__ import annotations

import argparse
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..config import ConfigError, Settings, replace
from ..master import ProtocolMismatch
from ..miner import Miner
from ..node import NotRegistered, install_signals
from .personas import PersonaMiner, persona_problem

log = logging.getLogger("bistro.localnet.group")


@dataclass(frozen=True)
class GroupMember:
    """One miner of the group: its wallet name (also its directory's name), persona and metrics port."""

    name: str
    persona: str
    metrics_port: int = 0


def parse_members(spec: str) -> list[GroupMember]:
    """`NAME=PERSONA[@PORT],...` (`miner-3=shaped_copier,miner-4=honest@9104`): the group's miners."""
    members = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, rest = item.partition("=")
        persona, _, port = rest.partition("@")
        if not sep or not name or not persona:
            raise ConfigError(f"--members: expected NAME=PERSONA[@PORT], got {item!r}")
        problem = persona_problem(persona)
        if problem is not None:
            raise ConfigError(problem)
        members.append(GroupMember(name, persona, int(port) if port else 0))
    if not members:
        raise ConfigError("--members: no miner named")
    if len({m.name for m in members}) != len(members):
        raise ConfigError("--members: a name appears twice")
    return members


def member_settings(settings: Settings, nodes_dir: str, member: GroupMember) -> Settings:
    """The settings a one-process miner of this member would get: its own directory and wallet,
    its bucket derived from its hotkey (`node.default_bucket`, as the local network names it)."""
    return replace(
        settings,
        dir=f"{nodes_dir}/{member.name}",
        **{"wallet.name": member.name, "storage.bucket": "", "metrics.port": member.metrics_port},
    )


def build(settings: Settings, member: GroupMember) -> Miner:
    """The miner `bistro miner` (honest) or `bistro persona-miner` would build."""
    miner = Miner(settings) if member.persona == "honest" else PersonaMiner(settings, member.persona)
    # its uploads logged under its own name (nothing is submitted before `run`: no thread to stop)
    miner.uploader.shutdown(wait=False)
    miner.uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{member.name}-upload")
    return miner


def run_group(miners: dict[str, Miner], stop: threading.Event, windows: int = 0) -> int:
    """Run every miner's own loop in its own thread until `stop` (or `windows` each); the exit code
    a one-process miner would have given, the worst of them (2: a protocol mismatch, 1: a bug)."""
    codes: dict[str, int] = {}

    def one(name: str, miner: Miner) -> None:
        try:
            miner.run(windows)
            codes[name] = 0
        except ProtocolMismatch as e:
            log.error("%s: %s", name, e)
            codes[name] = 2
        except Exception:  # noqa: BLE001 -- its own process would end here: the group ends with it
            log.exception("%s: the miner's loop failed: stopping the group", name)
            codes[name] = 1
        if codes[name]:
            stop.set()  # its own process would have ended: the group's does
            miner.close()

    threads = [threading.Thread(target=one, args=item, name=item[0], daemon=True) for item in miners.items()]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)  # the main thread stays free for signals
    return max(codes.values(), default=1)


def main(settings: Settings, args: argparse.Namespace) -> int:
    """`bistro miners --members NAME=PERSONA,... --nodes-dir DIR`: the group's miners, one thread each."""
    try:
        members = parse_members(args.members)
        miners = {m.name: build(member_settings(settings, args.nodes_dir, m), m) for m in members}
    except (NotRegistered, ConfigError) as e:
        log.error("%s", e)
        return 1
    stop = threading.Event()
    for miner in miners.values():
        miner.stopping = stop  # one signal, or one miner's end, stops every loop after its window
    install_signals(stop)
    for handler in logging.getLogger().handlers:  # each line names its miner (the thread's name)
        if type(handler.formatter) is logging.Formatter:
            handler.setFormatter(logging.Formatter("%(threadName)s %(name)s: %(message)s"))
    for name, miner in miners.items():
        log.info("%s: miner uid %d hotkey %s bucket %s", name, miner.uid, miner.hotkey, miner.commitment)
    return run_group(miners, stop, args.windows)
