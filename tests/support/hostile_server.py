"""The tests' hostile peer server: `bistro.localnet.hostile` (one copy, also used by the
`hostile:<behaviour>` miner personas), plus TLS contexts for it and the figures of
docs/reliability.md ("Hostile peer storage": `python -m tests.hostile_server`)."""

from __future__ import annotations

import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bistro.localnet.hostile import BEHAVIOURS, Handler, HostileServer

__all__ = ["BEHAVIOURS", "Handler", "HostileServer", "tls_contexts"]


def tls_contexts(hostname: str, tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts: a throwaway CA, a certificate for `hostname` signed by it,
    and a client context that trusts only that CA (hostname checks on, as by default)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
             ca: bool) -> x509.Certificate:  # fmt: skip
        b = x509.CertificateBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        )
        b = b.issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        b = b.public_key(key.public_key()).serial_number(x509.random_serial_number())
        b = b.not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("bistro test CA", ca_key, "bistro test CA", ca_key, True)
    leaf = cert(hostname, leaf_key, "bistro test CA", ca_key, False)
    pem = serialization.Encoding.PEM
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "leaf.pem", tmp / "leaf.key")
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client


# -- `python -m tests.hostile_server`: the figures in docs/reliability.md ------------------------


def _measure(deadline: float, counts: list[int]) -> None:
    import resource

    import bittensor_core
    import torch

    from bistro.config import StorageConfig
    from bistro.delta.signed import pack_signed, unpack_signed
    from bistro.storage import gather, open_peer_store
    from bistro.verdicts import V, fetch_verdict

    alice = bittensor_core.Keypair.create_from_uri("//Alice")
    blob = pack_signed({"w": torch.arange(512, dtype=torch.float32)}, {"kind": "delta"}, alice)
    key, cap, cfg = "bistro/212/deltas/7/x.safetensors", 64 * 1024, StorageConfig()

    def verdict(r: bytes | BaseException) -> V:
        try:
            if isinstance(r, BaseException):
                raise r
            unpack_signed(r, signer=alice.ss58_address, max_bytes=cap)
        except Exception as e:  # noqa: BLE001 -- the one mapping, as the validator uses it
            return fetch_verdict(e)
        return V.ok

    server = HostileServer(blob)
    print(f"| behaviour | verdict | seconds (deadline {deadline:g} s) |\n| --- | --- | --- |")
    for name in BEHAVIOURS:
        store = open_peer_store(f"{server.url}/{name.replace('_', '-')}", cfg, allow_private=True)
        t0 = time.monotonic()
        [r] = gather([(store, key)], max_bytes=cap, deadline=t0 + deadline)
        print(f"| {name} | {verdict(r).value} | {time.monotonic() - t0:.2f} |")
    server.stop()
    print(
        "\n| hostile peers (trickle) + 1 honest | gather wall s | CPU s | honest ok |\n| --- | --- | --- | --- |"
    )
    for n in counts:
        servers = [HostileServer(blob) for _ in range(n + 1)]
        items = [(open_peer_store(f"{s.url}/trickle", cfg, allow_private=True), key) for s in servers[1:]]
        items.append((open_peer_store(f"{servers[0].url}/honest", cfg, allow_private=True), key))
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        out = gather(items, max_bytes=cap, deadline=t0 + deadline)
        wall, cpu1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        print(f"| {n} | {wall:.2f} | {cpu:.2f} | {out[-1] == blob} |")
        for s in servers:
            s.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.hostile_server")
    parser.add_argument("--deadline", type=float, default=3.0)
    parser.add_argument("--counts", default="0,1,16,64,128")
    args = parser.parse_args()
    _measure(args.deadline, [int(n) for n in args.counts.split(",")])
