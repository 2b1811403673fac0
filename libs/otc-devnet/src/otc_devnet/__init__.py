"""A local Unicity-like UTXO chain served over the Electrum protocol.

Real Bitcoin-format blocks and segwit transactions (python-bitcoinlib), a UTXO set, a mempool
that validates like bitcoind, mining on request or on a timer, reorgs on request; spoken to
over Electrum protocol 1.4 exactly as a production Fulcrum server would be.
"""

__version__ = "0.1.0"
