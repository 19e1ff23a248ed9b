"""Keys for reading pages once: a page's content key, and the key of each full block of a prompt.

Two questions about one document send the same pages, and their prompts begin with the same tokens.
``worker.paged`` keeps what such a prompt prefix costs, so that the next row need not pay it again:
the vision tower's output for each page (``worker.encoder_cache``) and the KV cache blocks the prefix
filled (``worker.blocks``). Both are found by the keys made here; nothing here needs torch.

A page's key (:func:`page_key`) names the fitted page as the vision tower sees it: the sha256 of the
bytes it was decoded from (a blob's key, which the worker checks against the bytes before it decodes
them, so a corrupt blob never gets this far) with its fitted size and mode; or, for an image given
without one, a hash of its pixels, mode and size.

A block's key (:func:`block_keys`) is a hash of the key of the block before it, the block's token ids
and the key of every page with an image token in the block. Every page has the same placeholder ids,
so the ids alone never make a key; and since each key covers the one before it, a block's key covers
every token and page of the prompt up to and through it, which is all its keys and values depend on.
Only blocks the prompt fills are keyed: the last, partial one is always the row's own.

A job's cache scope (``submit(cache_scope=...)``; the gateway's API key) starts every key of its pages
and blocks, so jobs of different scopes never share, and no scope can tell from a result's timings
what another asked about.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from PIL import Image

from glyphq.worker.blocks import BLOCK_TOKENS

#: Bytes of a key (blake2b digest): collisions are out of reach at any cache size.
KEY_BYTES = 16


def page_key(image: Image.Image, source: str | None = None, scope: str | None = None) -> bytes:
    """The content key of a fitted page: the ``source`` it was decoded and fitted from (the sha256 of
    its bytes, checked) and its size and mode, or without one its pixels, size and mode; within the
    job's cache ``scope`` (the keys of one scope never equal another's)."""
    digest = hashlib.blake2b(_scoped(scope), digest_size=KEY_BYTES)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    if source is not None:
        digest.update(b"sha256:" + source.encode())
    else:
        digest.update(image.tobytes())
    return digest.digest()


def page_spans(ids: Sequence[int], image_token: int | None, page_tokens: Sequence[int]) -> list[int]:
    """The page each token of ``ids`` shows (-1 for text), given each page's count of image tokens, in
    the prompt's order. Raises ValueError if the counts do not add up to the prompt's image tokens."""
    owner = [-1] * len(ids)
    if image_token is None or not page_tokens:
        return owner
    page, left = 0, page_tokens[0]
    for i, token in enumerate(ids):
        if token != image_token:
            continue
        while left == 0:
            page += 1
            if page >= len(page_tokens):
                raise ValueError("the prompt holds more image tokens than its pages")
            left = page_tokens[page]
        owner[i] = page
        left -= 1
    if page != len(page_tokens) - 1 or left:
        raise ValueError("the prompt holds fewer image tokens than its pages")
    return owner


def block_keys(ids: Sequence[int], owner: Sequence[int], pages: Sequence[bytes],
               scope: str | None = None) -> list[bytes]:
    """The key of each full block of a prompt of token ``ids`` whose token ``i`` shows page
    ``owner[i]`` (-1: text, see :func:`page_spans`) of the pages keyed ``pages``, in cache ``scope``."""
    keys: list[bytes] = []
    parent = _scoped(scope)
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        digest = hashlib.blake2b(parent, digest_size=KEY_BYTES)
        digest.update(array("q", ids[start:start + BLOCK_TOKENS]).tobytes())
        shown = sorted({p for p in owner[start:start + BLOCK_TOKENS] if p >= 0})
        for page in shown:
            digest.update(pages[page])
        parent = digest.digest()
        keys.append(parent)
    return keys


def _scoped(scope: str | None) -> bytes:
    """What every key of a cache scope starts from (nothing for the shared scope)."""
    return b"" if scope is None else b"scope:" + scope.encode() + b"\0"
