"""Encoding of one chunk into a stored blob and back: id, codec byte, optional encryption.

A blob is ``codec byte + payload`` (codec 0 stored, 1 zstd). In an encrypted archive the blob
is ``nonce(12) + AES-256-GCM(codec byte + payload)`` with the chunk id as associated data, so
a blob cannot be swapped for another. Chunk ids are SHA-256 of the plaintext, or in an
encrypted archive HMAC-SHA256 (id key) of that digest, so ids reveal nothing without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

import zstandard

from lifeboat.archive.errors import CorruptChunk

CODEC_STORED = 0
CODEC_ZSTD = 1
NONCE_LEN = 12
_KEY_CHECK_LABEL = b"lifeboat key check v1"


class Keys:
    """The two keys derived from a key file: one encrypts blobs, one keys chunk ids."""

    def __init__(self, secret: bytes, salt: bytes) -> None:
        # cryptography is imported here, not at the top: only encrypted archives need it, and it
        # would add to the start-up time of every lifeboat command.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"lifeboat archive keys").derive(secret)
        self.aead = AESGCM(okm[:32])
        self.id_key = okm[32:]

    def check_value(self) -> str:
        """A value stored in the config that tells a right key from a wrong one."""
        return hmac.new(self.id_key, _KEY_CHECK_LABEL, hashlib.sha256).hexdigest()


class Codec:
    """Turns plaintext chunks into blobs and back; safe to share between threads."""

    def __init__(self, level: int = 3, keys: Keys | None = None) -> None:
        self.level = level
        self.keys = keys
        self._local = threading.local()

    def _zc(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        return c

    def _zd(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The content address of ``data``."""
        digest = hashlib.sha256(data).digest()
        if self.keys is None:
            return digest
        return hmac.new(self.keys.id_key, digest, hashlib.sha256).digest()

    def encode(self, chunk_id: bytes, data: bytes | bytearray | memoryview) -> bytes:
        """The blob stored for ``data``: compressed when that helps, then encrypted if keyed."""
        packed = self._zc().compress(data)
        plain = bytes([CODEC_ZSTD]) + packed if len(packed) < len(data) else bytes([CODEC_STORED]) + data
        if self.keys is None:
            return plain
        nonce = os.urandom(NONCE_LEN)
        return nonce + self.keys.aead.encrypt(nonce, plain, chunk_id)

    def decode(self, chunk_id: bytes, blob: bytes, raw_length: int, *, full_check: bool = False) -> bytes:
        """The plaintext of a blob; ``CorruptChunk`` if it is damaged.

        Every read is checked: zstd frames carry an XXH64 content checksum that the decoder
        verifies, encrypted blobs are authenticated, and stored (uncompressed) chunks are hashed.
        ``full_check`` (used by ``verify``) recomputes the chunk id of every chunk as well.
        """
        name = chunk_id.hex()
        if self.keys is not None:
            from cryptography.exceptions import InvalidTag

            try:
                blob = self.keys.aead.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], chunk_id)
            except InvalidTag:
                raise CorruptChunk(f"chunk {name}: authentication failed (damaged or wrong key)") from None
        if not blob:
            raise CorruptChunk(f"chunk {name}: empty blob")
        codec, payload = blob[0], blob[1:]
        if codec == CODEC_STORED:
            data = bytes(payload)
            full_check = True
        elif codec == CODEC_ZSTD:
            try:
                data = self._zd().decompress(payload, max_output_size=raw_length)
            except zstandard.ZstdError as e:
                raise CorruptChunk(f"chunk {name}: cannot decompress ({e})") from None
        else:
            raise CorruptChunk(f"chunk {name}: unknown codec id {codec}")
        if len(data) != raw_length or (full_check and self.chunk_id(data) != chunk_id):
            raise CorruptChunk(f"chunk {name}: content does not match its id")
        return data
