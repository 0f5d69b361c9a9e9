"""BISTRO: incentivized decentralized training of one language model on Bittensor."""

__version__ = "0.1.0"
