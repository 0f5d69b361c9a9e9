"""Research and test tooling, the top layer: never imported by a miner or a validator.

network.py   `bistro localnet`: a whole network on this machine, one process per node
personas.py  miner behaviours (the cheats the incentive must beat) as `PersonaMiner(Miner)`
hostile.py   misbehaving HTTP servers that stand in for a peer's bucket
s3server.py  the loopback S3 endpoint (moto's server mode) behind `--storage s3`
"""
