// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title BalanceReader
/// @notice Never deployed. Its init code, with the addresses to read appended as the constructor
///         argument, is sent as an `eth_call` without `to`; the constructor returns their native
///         balances. One call reads a whole watch set on any node, with nothing on chain.
/// @dev A simulated creation's return data is its "deployed code", so it is bound by EIP-170
///      (24,576 bytes) and must not start with 0xEF (EIP-3541). Hence a leading 32-byte count,
///      whose first byte is zero, and balances packed into 16 bytes each: up to 1,534 addresses
///      per call. A balance of 2**128 wei or more, far beyond any chain's supply, reads as
///      2**128 - 1, which callers treat as unknown.
contract BalanceReader {
    constructor(address[] memory accounts) {
        uint256 count = accounts.length;
        // 16 bytes of slack: each 32-byte store below spills into the next entry's slot.
        bytes memory out = new bytes(32 + 16 * count + 16);
        assembly {
            mstore(add(out, 32), count)
        }
        for (uint256 i = 0; i < count; ++i) {
            uint256 amount = accounts[i].balance;
            if (amount > type(uint128).max) {
                amount = type(uint128).max;
            }
            assembly {
                mstore(add(add(out, 64), mul(i, 16)), shl(128, amount))
            }
        }
        assembly {
            return(add(out, 32), add(32, mul(count, 16)))
        }
    }
}
