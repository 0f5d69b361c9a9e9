"""`bistro localnet`: a whole network on this machine, every node its own OS process.

Creates wallets, the embedded chain (`DIR/chain.sqlite`), buckets (`DIR/buckets/<bucket>/`),
registers every hotkey, stakes the validators, starts the real `bistro miner` / `bistro validator`
processes (with `--miners-per-process K`, one `bistro miners` process per K miners, each miner its
own thread: `group.py`), follows the master as any node would, shows a table per window, and at the end writes
`DIR/summary.json` and plots. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import protocol
from ..chain.local import LocalChain
from ..config import ALIASES, LOCAL_MECHANISM, Settings, replace
from ..data import Dataset
from ..data.pages import global_pages
from ..export import localnet_model
from ..master import Follower, MasterError, Position
from ..model import build_model, sequence_losses, state_tensors
from ..node import default_bucket, publisher_at
from ..storage import open_store
from ..storage.base import StorageError, Store
from ..wallet import open_wallet
from ..windowlog import WindowLog
from .personas import PERSONAS, persona_problem
from .s3server import S3SimUnavailable, require_moto

log = logging.getLogger("bistro.localnet")

ADVERSARIAL = tuple(p for p in PERSONAS if p != "honest")


@dataclass
class Member:
    name: str
    role: str
    persona: str
    hotkey: str = ""
    uid: int = -1
    bucket: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)
    """Its OS process: shared by the miners of one `bistro miners` group."""
    flags: list[str] = field(default_factory=list)
    """Flags of this member alone (`--validator-flags`): node-local settings such as its link."""
    log_name: str = ""
    """Its log file under `logs/` without `.log` (its name, or its group's: `miners-0`)."""


FORWARDED = ("model.", "train.", "mechanism.")
"""Flags given to `bistro localnet` that every member gets as well (the rest, such as `--dir`,
`--wallet.*` or `--train.threads`, the network sets per member)."""


def validator_flags(specs: list[str], validators: int) -> dict[int, list[str]]:
    """`--validator-flags I:FLAGS` (repeatable): flags for validator I alone, after the network's,
    e.g. `1:--mechanism.link_bytes_per_second=3000` (a slow link of its own). Only node-local
    settings: a protocol setting (`config.protocol_settings`: the model, the netuid, the mechanism but
    `LOCAL_MECHANISM`) must be the whole network's, and a node that differs would stop (exit 2)."""
    out: dict[int, list[str]] = {}
    for spec in specs:
        index, sep, text = spec.partition(":")
        if not sep or not index.strip().isdigit() or not 0 <= int(index) < validators:
            raise SystemExit(
                f"--validator-flags {spec!r}: expected I:FLAGS with I a validator (0..{validators - 1})"
            )
        flags: list[str] = []
        for word in shlex.split(text):
            name, eq, value = word.partition("=")
            flags += [name, value] if word.startswith("--") and eq else [word]
            path = ALIASES.get(name[2:], name[2:]) if word.startswith("--") else ""
            section, _, key = path.partition(".")
            if (
                section == "model"
                or path == "chain.netuid"
                or (section == "mechanism" and key not in LOCAL_MECHANISM)
            ):
                raise SystemExit(
                    f"--validator-flags {spec!r}: {path} is a protocol setting, the same on every node "
                    "(a node that differs stops): give it to the whole network"
                )
        out.setdefault(int(index), []).extend(flags)
    return out


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    """`--train.steps_per_window 2` and the like, as given to `bistro localnet`, for a member's
    command line: a localnet flag that reached only the localnet process (the miners trained 30
    steps of `small` for `--train.steps_per_window 2`) changed nothing the network did."""
    out: list[str] = []
    for key, value in sorted(vars(args).items()):
        name = key.removeprefix("cfg:")
        if (
            key.startswith("cfg:")
            and value is not None
            and name.startswith(FORWARDED)
            and name != "train.threads"
        ):
            out += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


class LocalNet:
    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(settings.dir).expanduser().resolve()
        block_time = args.block_time or 2.0
        self.settings = replace(
            settings,
            **{
                "chain.network": "embedded",
                "chain.chain_endpoint": str(self.dir / "chain.sqlite"),
                "chain.block_time": block_time,
                "chain.tempo": settings.mechanism.blocks_per_window,
                "chain.weights_rate_limit": 1,
                "chain.immunity_period": 10_000,
                "storage.root": str(self.dir),
                "wallet.path": str(self.dir / "wallets"),
                "dir": str(self.dir),
            },
        )
        personas = [p.strip() for p in args.personas.split(",") if p.strip()] if args.personas else []
        if len(personas) > args.miners:
            raise SystemExit(f"--personas lists {len(personas)} personas for {args.miners} miners")
        for p in personas:
            problem = persona_problem(p)
            if problem is not None:
                raise SystemExit(problem)
        personas += ["honest"] * (args.miners - len(personas))
        self.members = [Member(f"validator-{i}", "validator", "validator") for i in range(args.validators)]
        self.members += [Member(f"miner-{i}", "miner", p) for i, p in enumerate(personas)]
        for i, flags in validator_flags(
            getattr(args, "validator_flags", None) or [], args.validators
        ).items():
            self.members[i].flags = flags
        for m in self.members:
            m.log_name = m.name
        if self.miners_per_process > 1:
            for i, group in enumerate(self.groups()):
                for m in group:
                    m.log_name = f"miners-{i}"
        self.s3 = None

    # --- set-up -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        for sub in ("chain.sqlite", "chain.sqlite-wal", "chain.sqlite-shm", "buckets", "logs", "nodes",
                    "wallets", "summary.json", "network.json"):  # fmt: skip
            path = self.dir / sub
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        if self.settings.storage.backend == "s3":
            self._start_s3()
        log.info("preparing data and tokenizer (cached after the first run)")
        self.dataset = Dataset.open(self.settings)
        chain = LocalChain(self.dir / "chain.sqlite", self.settings.chain)
        for i, m in enumerate(self.members):
            wallet = open_wallet(replace(self.settings, **{"wallet.name": m.name}).wallet, create=True)
            m.hotkey = wallet.hotkey.ss58_address
            m.uid = chain.register(wallet)
            m.bucket = default_bucket(m.hotkey)
            if m.role == "validator":
                chain.add_stake(m.hotkey, 1000.0 * (len(self.members) - i))
            if self.settings.storage.backend == "s3":
                # public-read: peers read each other's buckets unsigned (open_peer_store)
                open_store(m.bucket, self.settings.storage).create_bucket(public_read=True)
        self.chain = chain
        self._write_network_json()

    def _start_s3(self) -> None:
        try:
            require_moto()
        except S3SimUnavailable as e:
            raise SystemExit(f"--storage s3: {e}") from None
        proc = subprocess.Popen(
            [sys.executable, "-m", "bistro.localnet.s3server", "--port", "0"],
            stdout=subprocess.PIPE, stderr=open(self.dir / "logs" / "s3.log", "w"), text=True,
        )  # fmt: skip
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            proc.kill()
            raise SystemExit("the loopback S3 server did not start (see logs/s3.log)")
        self.s3 = proc
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "localnet")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "localnet")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self.settings = replace(self.settings, **{"storage.endpoint_url": url, "storage.path_style": True})
        log.info("loopback S3 at %s", url)

    def _write_network_json(self) -> None:
        s = self.settings
        doc = {
            "netuid": s.chain.netuid,
            "block_time": s.chain.block_time,
            "blocks_per_window": s.mechanism.blocks_per_window,
            "storage": s.storage.backend,
            "s3_endpoint": s.storage.endpoint_url or None,
            "uids": [
                {
                    "uid": m.uid,
                    "hotkey": m.hotkey,
                    "name": m.name,
                    "persona": m.persona,
                    "role": m.role,
                    "bucket": m.bucket,
                    "metrics_port": self.metrics_port(m),
                    "log": f"logs/{m.log_name}.log",
                    "bucket_dir": str(self.dir / "buckets" / m.bucket)
                    if s.storage.backend == "local"
                    else None,
                }  # fmt: skip
                for m in self.members
            ],
        }
        (self.dir / "network.json").write_text(json.dumps(doc, indent=2))

    def metrics_port(self, m: Member) -> int | None:
        """`--metrics-ports BASE`: member k (validators first, then miners) serves
        `http://127.0.0.1:BASE+k/metrics`; None without the flag."""
        base = int(getattr(self.args, "metrics_ports", 0) or 0)
        return base + self.members.index(m) if base else None

    def threads(self, m: Member) -> int:
        """One thread a miner: on 2 cores shared by a dozen busy processes, two OpenMP threads per
        process wait on each other and run many times slower. A validator scores while the miners
        wait for the master it publishes, so a lone validator takes two (24 s to 16 s a window of
        the demo on 2 cores; miners missed every other deadline at one), unless `--validator-threads`
        says otherwise: with two threads, a single busy process beside the network (another
        program, a test) made a `tiny` validator score 10 uids in 55 s instead of 5; with one, 8 s."""
        if m.role != "validator":
            return 1
        if chosen := int(getattr(self.args, "validator_threads", 0) or 0):
            return chosen
        validators = sum(1 for x in self.members if x.role == "validator")
        return max(1, min(2, (os.cpu_count() or 1) // max(1, validators)))

    def command(self, m: Member) -> list[str]:
        s = self.settings
        # an honest miner is the production `bistro miner`; any other persona runs as a PersonaMiner
        command = "persona-miner" if m.role == "miner" and m.persona != "honest" else m.role
        cmd = [
            sys.executable, "-m", "bistro.cli", command, "--preset", s.preset,
            "--dir", str(self.dir / "nodes" / m.name), "--wallet.path", s.wallet.path,
            "--wallet.name", m.name, "--wallet.hotkey", "default", "--subtensor.network", "embedded",
            "--subtensor.chain_endpoint", s.chain.chain_endpoint, "--netuid", str(s.chain.netuid),
            "--storage", s.storage.backend, "--storage.root", s.storage.root, "--bucket", m.bucket,
            "--train.threads", str(self.threads(m)), "--device", s.device,
        ]  # fmt: skip
        if s.storage.backend == "s3":
            cmd += ["--s3.endpoint_url", s.storage.endpoint_url, "--s3.path_style", "true"]
        d = s.data
        cmd += ["--data.corpus", d.corpus, "--data.tokenizer", d.tokenizer, "--data.cache_dir", d.cache_dir]
        if d.hub_root:
            cmd += ["--data.hub_root", d.hub_root]
        if m.role == "miner":
            if command == "persona-miner":
                cmd += ["--persona", m.persona]
            if s.train.fsdp:
                cmd += ["--train.fsdp", "true"]
            if s.train.activation_checkpointing:
                cmd += ["--train.activation_checkpointing", "true"]
        if self.args.config:
            cmd += ["--config", self.args.config]
        if self.metrics_port(m) is not None:
            cmd += ["--metrics.port", str(self.metrics_port(m))]
        cmd += forwarded_flags(self.args) + m.flags  # its own flags last: they win
        nproc = self.nproc_per_miner
        if command == "miner" and nproc > 1:
            # One miner on N processes (gloo on CPU, NCCL on GPU); --standalone picks a free port.
            torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
            cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
        return cmd

    @property
    def miners_per_process(self) -> int:
        """Miners sharing one `bistro miners` process (`--miners-per-process`; 1: a process each)."""
        return int(getattr(self.args, "miners_per_process", 1) or 1)

    def groups(self) -> list[list[Member]]:
        """The miners, `miners_per_process` to a process, in uid order (one each without the flag)."""
        miners = [m for m in self.members if m.role == "miner"]
        k = self.miners_per_process
        return [miners[i : i + k] for i in range(0, len(miners), k)]

    def group_command(self, group: list[Member]) -> list[str]:
        """`bistro miners` for `group`: the command line the group's first miner would get, with
        its own directory, wallet and bucket replaced by each member's (`group.member_settings`)."""
        cmd = self.command(group[0])
        drop = {"--dir", "--wallet.name", "--bucket", "--persona", "--metrics.port"}
        kept = [a for i, a in enumerate(cmd) if a not in drop and (i == 0 or cmd[i - 1] not in drop)]
        members = ",".join(
            f"{m.name}={m.persona}" + (f"@{self.metrics_port(m)}" if self.metrics_port(m) else "")
            for m in group
        )
        # kept[3] is the command's name (miner or persona-miner)
        return [*kept[:3], "miners", *kept[4:], "--members", members,
                "--nodes-dir", str(self.dir / "nodes")]  # fmt: skip

    @property
    def nproc_per_miner(self) -> int:
        """Processes each miner runs on (`--nproc-per-miner`; 1 when the caller's args lack it)."""
        return int(getattr(self.args, "nproc_per_miner", 1) or 1)

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        grouped = self.miners_per_process > 1
        units = [([m], self.command(m)) for m in self.members if m.role != "miner" or not grouped]
        if grouped:
            units += [(g, self.group_command(g)) for g in self.groups()]
        for members, cmd in units:
            log_file = open(self.dir / "logs" / f"{members[0].log_name}.log", "w")
            process = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            for m in members:
                m.process = process
        log.info("started %d processes; logs in %s", len(units), self.dir / "logs")

    def processes(self) -> list[subprocess.Popen]:
        """Each OS process once (a group's miners share one)."""
        out: dict[int, subprocess.Popen] = {}
        for m in self.members:
            if m.process is not None:
                out.setdefault(id(m.process), m.process)
        return list(out.values())

    def stop(self) -> None:
        procs = [p for p in self.processes() if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_s3(self) -> None:
        if self.s3 is not None:
            self.s3.terminate()
            self.s3.wait(timeout=10)
            self.s3 = None

    def wait_until_mining(self, timeout: float) -> int:
        """Wait until every miner has committed its bucket and every honest one has uploaded a delta
        (it is set up, has followed the master and trained a window), one of their processes has
        ended, or `timeout` seconds; return the window after: the first the network counts. On 2 busy
        cores a dozen nodes take minutes to import, build their models and warm up, and windows scored
        before then measure start-up, not the mechanism."""
        miners = [m for m in self.members if m.role == "miner"]
        bpw, netuid = self.settings.mechanism.blocks_per_window, self.settings.chain.netuid
        s = self.settings.storage
        stores = {m.name: open_store(m.bucket, s, root=s.root) for m in miners if m.persona == "honest"}

        def uploaded(m: Member, since: int, now: int) -> bool:
            try:
                return any(
                    stores[m.name].head(protocol.delta_key(netuid, w, m.hotkey))
                    for w in range(since, now + 1)
                )
            except StorageError:
                return False

        since = protocol.window_of(self.chain.block(), bpw)
        deadline = time.time() + timeout
        while time.time() < deadline:
            now = protocol.window_of(self.chain.block(), bpw)
            if {m.uid for m in miners} <= set(self.chain.commitments()) and all(
                uploaded(m, since, now) for m in miners if m.name in stores
            ):
                break
            if any(m.process is not None and m.process.poll() is not None for m in miners):
                break
            time.sleep(1.0)
        else:
            log.warning("miners still starting after %.0fs: counting windows from now", timeout)
        return protocol.window_of(self.chain.block(), bpw) + 1

    def crashed(self) -> list[str]:
        """Members whose process ended by itself with a non-zero code."""
        return [m.name for m in self.members if m.process is not None and m.process.poll() not in (None, 0)]


class Observer:
    """Follows the master like any node and evaluates each θ_w on fixed held-out pages."""

    def __init__(self, net: LocalNet) -> None:
        self.net = net
        s = net.settings
        self.model = build_model(s.model, seed=s.model.seed)
        self.model.eval()
        self.params = state_tensors(self.model)
        shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.follower = Follower(s.chain.netuid, shapes, sum(v.numel() * 4 for v in self.params.values()))
        # Fixed pages, the same for every window: a held-out measure of the master alone.
        self.pages = global_pages(s.chain.netuid, -1, "held-out", net.dataset.page_settings)
        self.sequences = net.dataset.sequences(self.pages)[:64]
        self.position: Position | None = None
        self.losses: dict[int, float] = {}
        self.hashes: dict[int, str] = {}
        """Hash of each θ_w followed."""

    def source(self, window: int) -> tuple[Store, str] | None:
        """The bucket and hotkey θ_window comes from: its publisher, as every node reads it."""
        hotkey = publisher_of(self.net, window - 1)
        member = next((m for m in self.net.members if m.hotkey == hotkey), None)
        if member is None:
            return None
        s = self.net.settings
        return open_store(member.bucket, s.storage, root=s.storage.root), hotkey

    def update(self) -> None:
        now = protocol.window_of(self.net.chain.block(), self.net.settings.mechanism.blocks_per_window)
        newest = self.source(now)  # θ_now is the newest a node can hold
        try:
            latest = newest and self.follower.latest(*newest)
        except (MasterError, StorageError) as e:
            log.debug("observer: %s", e)
            return
        if not latest:
            return
        start = self.position.window if self.position else int(latest["checkpoint"])
        for target in range(start, int(latest["window"]) + 1):
            if target in self.losses:
                continue
            source = self.source(target)
            try:
                if source is None:
                    raise MasterError(f"no publisher for θ_{target}")
                self.position = self.follower.sync(*source, self.params, self.position, target)
            except (MasterError, StorageError) as e:
                log.debug("observer: %s", e)
                self.position = None
                return
            self.hashes[target] = self.position.hash
            self.losses[target] = float(sequence_losses(self.model, self.sequences, 32).double().mean())


def publisher_of(net: LocalNet, window: int) -> str | None:
    """The hotkey that publishes update-{window}, by the rule every node follows (`publisher_at`)."""
    return publisher_at(net.chain, window, net.settings.mechanism.blocks_per_window)


def validator_records(net: LocalNet, v: Member) -> list[dict]:
    """Every record `v` has written so far (its archives, then windows.jsonl)."""
    return WindowLog(net.dir / "nodes" / v.name / "validator").read()


def records(net: LocalNet, validator: Member | None = None) -> list[dict]:
    """The per-window records written so far: `validator`'s, or by default, for each window, the
    record of the validator that published it (the publisher's view, as stake moves)."""
    if validator is not None:
        return validator_records(net, validator)
    by_hotkey = {m.hotkey: validator_records(net, m) for m in net.members if m.role == "validator"}
    windows = sorted({r["window"] for rs in by_hotkey.values() for r in rs})
    out = []
    for w in windows:
        mine = by_hotkey.get(publisher_of(net, w) or "", [])
        record = next((r for r in mine if r["window"] == w), None)
        if record is not None:
            out.append(record)
    return out


def _print_window(net: LocalNet, record: dict, master_loss: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    mg = net.chain.metagraph()
    by_uid = {m.uid: m for m in net.members}
    table = Table(
        title=f"window {record['window']}  (master loss {master_loss if master_loss is None else round(master_loss, 4)})"
    )
    for col in ("uid", "persona", "verdict", "score", "moving avg", "weight", "incentive"):
        table.add_column(col, justify="right" if col not in ("persona", "verdict") else "left")
    for uid, r in sorted(record["uids"].items(), key=lambda kv: int(kv[0])):
        m = by_uid.get(int(uid))
        table.add_row(
            uid, m.persona if m else "?", r["verdict"], f"{r['score']:+.5f}", f"{r['moving_average']:+.5f}",
            f"{r['weight']:.3f}", f"{mg.incentive_of(int(uid)):.3f}",
        )  # fmt: skip
    Console().print(table)


def summarize(net: LocalNet, records: list[dict], observer: Observer, wall: float) -> dict:
    mg = net.chain.metagraph()
    last = records[-1] if records else {"uids": {}}
    history = getattr(net, "incentive_history", [])
    uids = []
    for m in net.members:
        if m.role != "miner":
            continue
        rejections: dict[str, int] = {}
        for r in records:
            verdict = r["uids"].get(str(m.uid), {}).get("verdict")
            if verdict not in (None, "ok", "skip"):
                rejections[verdict] = rejections.get(verdict, 0) + 1
        uids.append({
            "uid": m.uid, "hotkey": m.hotkey, "persona": m.persona, "incentive": mg.incentive_of(m.uid),
            "paid": paid_over_run(history, m.uid),
            "weight": last["uids"].get(str(m.uid), {}).get("weight", 0.0),
            "moving_average": last["uids"].get(str(m.uid), {}).get("moving_average", 0.0),
            "rejections": rejections,
        })  # fmt: skip
    # Each validator's trust: how much of its weight survived consensus clipping (1: it agrees).
    validators = [
        {"uid": m.uid, "hotkey": m.hotkey, "validator_trust": mg.validator_trust_of(m.uid)}
        for m in net.members
        if m.role == "validator"
    ]
    total = sum(u["incentive"] for u in uids)
    honest = sum(u["incentive"] for u in uids if u["persona"] == "honest")
    run_total = sum(u["paid"] for u in uids)
    for u in uids:
        u["paid_share"] = u["paid"] / run_total if run_total > 0 else 0.0
    losses = [observer.losses[w] for w in sorted(observer.losses)]
    return {
        "windows_completed": len(records),
        "windows": [r["window"] for r in records],
        "master_loss": losses,
        "master_windows": sorted(observer.losses),
        "uids": uids,
        "validators": validators,
        "honest_incentive_share": honest / total if total > 0 else 0.0,
        "honest_paid_share": sum(u["paid"] for u in uids if u["persona"] == "honest") / run_total
        if run_total > 0
        else 0.0,
        "wall_seconds": round(wall, 1),
        "crashed": net.crashed(),
        "incentive_history": history,
        "settings": {
            "preset": net.settings.preset,
            "miners": net.args.miners,
            "validators": net.args.validators,
            "block_time": net.settings.chain.block_time,
            "blocks_per_window": net.settings.mechanism.blocks_per_window,
            "corpus": net.settings.data.corpus,
            "nproc_per_miner": net.nproc_per_miner,
            "miners_per_process": net.miners_per_process,
            "validator_flags": {m.name: m.flags for m in net.members if m.flags},
            "fsdp": net.settings.train.fsdp,
        },  # fmt: skip
    }


def paid_over_run(history: list[dict], uid: int) -> float:
    """What `uid` was paid over the run: its incentive summed over every window of
    `incentive_history` (a miner is paid every window; the last window's incentive alone missed a
    copier paid in three windows of fourteen)."""
    return float(sum(h["incentive"].get(str(uid), 0.0) for h in history))


def plot(net: LocalNet, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(summary["master_windows"], summary["master_loss"], marker="o")
    ax.set(xlabel="window", ylabel="held-out loss", title="master loss per window")
    fig.tight_layout()
    fig.savefig(net.dir / "master_loss.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    history = summary["incentive_history"]
    by_uid = {u["uid"]: u for u in summary["uids"]}
    for uid, info in by_uid.items():
        ax.plot([h["window"] for h in history], [h["incentive"].get(str(uid), 0.0) for h in history],
                label=f"{uid} {info['persona']}", linestyle="-" if info["persona"] == "honest" else "--")  # fmt: skip
    ax.set(xlabel="window", ylabel="incentive", title="incentive per uid")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(net.dir / "incentive.png", dpi=120)
    plt.close(fig)


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.validators < 1 or args.miners < 1 or args.windows < 1:
        log.error("need at least one validator, one miner and one window")
        return 2
    if getattr(args, "miners_per_process", 1) > 1 and getattr(args, "nproc_per_miner", 1) > 1:
        log.error("--miners-per-process and --nproc-per-miner: one or the other")
        return 2
    net = LocalNet(settings, args)
    start = time.time()
    try:
        net.prepare()
        return _run(net, args, start)
    finally:
        net.stop_s3()  # also when set-up or the run fails


def _run(net: LocalNet, args: argparse.Namespace, start: float) -> int:
    """Start the nodes, show each window as the top validator scores it, summarise, plot."""
    observer = Observer(net)
    net.incentive_history = []
    net.start()
    shown = 0
    scored: list[dict] = []
    bpw, bt = net.settings.mechanism.blocks_per_window, net.settings.chain.block_time
    first = net.wait_until_mining(timeout=600)
    log.info("every miner is up: counting %d windows from window %d", args.windows, first)
    deadline = time.time() + (args.windows + 4) * bpw * bt + 120
    try:
        while len(scored) < args.windows:
            if time.time() > deadline:
                log.error("timed out waiting for the validator")
                break
            validators = [m for m in net.members if m.role == "validator"]
            if all(m.process.poll() is not None for m in validators):
                log.error("every validator exited (see logs/%s.log)", validators[0].name)
                break
            time.sleep(min(bt, 2.0))
            scored = [r for r in records(net) if r["window"] >= first][: args.windows]
            observer.update()
            for record in scored[shown:]:
                mg = net.chain.metagraph()
                net.incentive_history.append({
                    "window": record["window"],
                    "incentive": {str(int(u)): float(i) for u, i in zip(mg.uids, mg.I, strict=True)},
                })  # fmt: skip
                pos = observer.position
                _print_window(net, record, observer.losses.get(pos.window) if pos else None)
            shown = len(scored)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping the network")
    finally:
        crashed = net.crashed()
        net.stop()
    observer.update()
    summary = summarize(net, scored, observer, time.time() - start)
    summary["crashed"] = crashed
    summary["model"] = localnet_model(
        net.settings, observer.params, observer.position, net.dataset, net.dir / "model"
    )
    (net.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(net, summary)
    _print_summary(summary, net)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if scored and not crashed else 1


def _print_summary(summary: dict, net: LocalNet) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="localnet summary")
    for col in ("uid", "persona", "share of run's pay", "paid", "last incentive", "weight", "moving avg",
                "rejections"):  # fmt: skip
        table.add_column(col)
    for u in sorted(summary["uids"], key=lambda u: (-u["paid"], -u["incentive"])):
        table.add_row(str(u["uid"]), u["persona"], f"{u['paid_share']:.3f}", f"{u['paid']:.3f}",
                      f"{u['incentive']:.3f}", f"{u['weight']:.3f}",
                      f"{u['moving_average']:+.5f}", json.dumps(u["rejections"]))  # fmt: skip
    console = Console()
    console.print(table)
    losses = summary["master_loss"]
    if losses:
        drop = (losses[0] - losses[-1]) / losses[0] * 100
        console.print(f"master loss {losses[0]:.4f} -> {losses[-1]:.4f} ({drop:.1f}% lower)")
    console.print(
        f"honest share of the run's pay {summary['honest_paid_share']:.3f}, every other persona together "
        f"{1 - summary['honest_paid_share'] if summary['honest_paid_share'] > 0 else 0:.3f} "
        f"(last window's incentive {summary['honest_incentive_share']:.3f}); "
        f"{summary['windows_completed']} windows in {summary['wall_seconds']:.0f}s; "
        f"crashed: {summary['crashed'] or 'none'}"
    )
    console.print(f"summary: {net.dir / 'summary.json'}; plots: master_loss.png, incentive.png")
    if summary.get("model"):
        m = summary["model"]
        console.print(f"model θ_{m['window']} exported to {m['dir']} (transformers); a sample:")
        console.print(m["sample"], markup=False, highlight=False)
