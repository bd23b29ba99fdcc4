"""Secure aggregation (SecAgg+, docs/secure_aggregation.md): the server learns a cohort's sum, not
one device's update. Pure code, no I/O; numpy, `cryptography` and the standard library only.

  * `shamir`: t-of-n Shamir sharing of 32-byte secrets over GF(2^256 + 297), with forged-share
    detection when more than t shares are given;
  * `key_agreement`: X25519 key pairs, shared secrets (low-order keys refused) and the HKDF
    keys bound to a purpose, a round and two device ids;
  * `share_box`: AES-256-GCM boxes carrying one device's pair of shares to one neighbour;
  * `prg`: the ChaCha20 mask generator, and adding/removing a mask modulo 2^r;
  * `graph`: the SecAgg+ neighbour graph (Harary graph over a seeded permutation), its default
    degree and the Shamir threshold;
  * `integer_encoding`: an update on the cohort's common integer grid, and the decoding of a sum;
  * `messages`: the protocol's messages.

Modules are imported by name (`from fedkb_core.secagg import shamir`); this file imports none.
"""
